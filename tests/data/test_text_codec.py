"""Text codecs: specs rebuild the same codec; bytes round-trip; decoding stops at EOS."""

from sparseformer.data import get_task
from sparseformer.data.text_codec import ByteCodec, WordCodec, from_spec


def test_specs_rebuild_the_same_codec(tmp_path):
    for codec in (get_task("listops").codec(None), get_task("retrieval").codec(None), ByteCodec(offset=3)):
        again = from_spec(codec.spec(), str(tmp_path))
        text = "( [MAX 1 9 ] )" if codec.kind == "words" and "[MAX" in codec.vocab else "k1:v2 _ ? k1"
        text = "héllo wörld" if codec.kind == "bytes" else text
        assert again.encode(text) == codec.encode(text)
        assert again.decode(codec.encode(text)) == codec.decode(codec.encode(text))


def test_bytes_and_words_decode_until_eos():
    b = ByteCodec(offset=3)
    assert b.decode(b.encode("héllo") + [2, 50, 0]) == "héllo"
    w = WordCodec(["a", "b"], offset=3, skip=("(",))
    assert w.encode("( a b a") == [3, 4, 3]
    assert w.decode([1, 3, 4, 0, 2, 3]) == "a b"
