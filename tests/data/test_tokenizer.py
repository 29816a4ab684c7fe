"""The built-in byte tokenizer as a Hugging Face tokenizer (what an export ships): the same ids,
the same text back, the same chat rendering."""
from tokenizers import pre_tokenizers

from qlora.data.formats import tokenize_parts
from qlora.data.tokenizer import ByteTokenizer, HFTokenizer, builtin_chat_parts, byte_symbols


def test_hf_tokenizer_gives_the_byte_tokenizers_ids():
    tok = ByteTokenizer()
    hf = tok.hf_tokenizer()
    assert sorted(byte_symbols()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    # every byte a UTF-8 text can hold: ASCII, the 2-byte range (lead bytes C2-DF, continuation
    # bytes 80-BF), 3- and 4-byte characters (lead bytes E0-EF, F0-F4)
    text = "".join(map(chr, range(0, 0x800))) + "\u4e2d\uffff\U0001f600\U0010ffff"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (256, 257, 258, tok.vocab_size)
    for token in range(256):  # lone bytes, valid or not, decode alike
        assert hf.decode([token]) == tok.decode([token])
    assert hf.decode(tok.encode(text) + [tok.eos_id], skip_special_tokens=True) == text
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]
    # the same tokens with the same trained ones (the pieces may be cut differently)
    ours = tokenize_parts(builtin_chat_parts(messages), tok, 64, False)
    theirs = tokenize_parts(HFTokenizer(hf).render_chat(messages), HFTokenizer(hf), 64, False)
    assert ours == theirs
    assert HFTokenizer(hf).chat_generation_prompt(messages[:2]) == tok.chat_generation_prompt(messages[:2])
