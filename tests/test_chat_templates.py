"""Chat templates everywhere a prompt is built: rendering, assistant-only SFT labels checked
token by token, stop ids, the same tokens in SFT and sampling, and reward models that
re-render a conversation in their own template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from alignkit.data.chat import PromptFormat, plain_prompt, stop_token_ids
from alignkit.errors import ConfigError
from alignkit.models import load_causal_lm
from alignkit.models.generation import decode_responses, generate, pad_prompts
from alignkit.models.tiny import IM_END, IM_START, TinyArchSpec, build_tiny_causal_lm
from alignkit.rewards.learned import encode_parts
from alignkit.stages.sft import collate, encode_pairs

CORPUS = [
    "What is the opposite of hot? cold. The plural of box is boxes.",
    "User: hello\nAssistant: hi there, how can I help?",
    "system user assistant You are a concise assistant.",
] * 10
QUESTION = [{"role": "user", "content": "What is the opposite of hot?"}]


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory: pytest.TempPathFactory):
    out = build_tiny_causal_lm(
        tmp_path_factory.mktemp("chat") / "llama", CORPUS, TinyArchSpec(vocab_size=400)
    )
    return load_causal_lm(out)


@pytest.fixture(scope="module")
def plain_lm(tmp_path_factory: pytest.TempPathFactory):
    spec = TinyArchSpec(arch="qwen2", vocab_size=400, chat=False)
    return load_causal_lm(
        build_tiny_causal_lm(tmp_path_factory.mktemp("plain") / "q", CORPUS, spec)
    )


def test_chat_mode_renders_the_template_and_cuts_the_reply_after_end_of_turn(chat_lm) -> None:
    _, tok = chat_lm
    fmt = PromptFormat(tok, "auto")
    assert fmt.chat
    assert fmt.prompt_text(QUESTION) == (
        f"{IM_START}user\nWhat is the opposite of hot?{IM_END}\n{IM_START}assistant\n"
    )
    prompt, response = fmt.encode(QUESTION, "cold")
    # The reply is the content and the end-of-turn token; the template's trailing newline is
    # not part of it, and no special token is added to either part.
    assert tok.decode(response) == f"cold{IM_END}"
    assert response[-1] == tok.convert_tokens_to_ids(IM_END)
    assert tok.decode(prompt) == fmt.prompt_text(QUESTION)
    assert tok.eos_token_id not in prompt + response


def test_plain_and_raw_modes_and_a_missing_template(chat_lm, plain_lm) -> None:
    _, chat_tok = chat_lm
    _, tok = plain_lm
    assert PromptFormat(chat_tok, "plain").prompt_text(QUESTION) == (
        "User: What is the opposite of hot?\nAssistant:"
    )
    fmt = PromptFormat(tok, "auto")
    assert not fmt.chat
    _, response = fmt.encode(QUESTION, " cold ")
    assert tok.decode(response) == f" cold{tok.eos_token}"
    # raw: a verbatim prompt is used as is, whatever the tokenizer.
    raw = PromptFormat(chat_tok, "raw")
    assert raw.prompt_text("Q: hot?\nA:") == "Q: hot?\nA:"
    assert chat_tok.decode(raw.encode_response("Q: hot?\nA:", "cold")) == f" cold{tok.eos_token}"
    with pytest.raises(ConfigError, match=r"task\.template=chat but the tokenizer has no chat"):
        PromptFormat(tok, "chat")
    with pytest.raises(ConfigError, match=r"task\.template='json'"):
        PromptFormat(tok, "json")


def test_plain_rendering_of_a_multi_turn_conversation() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": " Opposite of hot? "},
    ]
    assert plain_prompt(messages) == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Opposite of hot?\nAssistant:"
    )


def test_sft_labels_are_the_final_assistant_turn_token_by_token(chat_lm) -> None:
    _, tok = chat_lm
    fmt = PromptFormat(tok, "chat")
    conversation = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "What is the opposite of hot?"},
    ]
    [(ids, start)] = encode_pairs(fmt, [(conversation, "cold")], max_length=256)
    _, _, labels = collate([(ids, start)], tok.pad_token_id)
    expected_prompt = fmt.encode_prompt(conversation)
    assert ids[:start] == expected_prompt
    # Every prompt token (the system turn, the earlier assistant turn "hi there" and the
    # generation prompt "<|im_start|>assistant\n") is masked; the reply tokens are labelled.
    assert labels[0, :start].tolist() == [-100] * start
    labelled = labels[0, start:].tolist()
    assert labelled == ids[start:]
    assert [tok.decode([t]) for t in labelled][-1] == IM_END
    assert tok.decode(labelled) == f"cold{IM_END}"
    assert "hi there" in tok.decode(ids[:start])


def test_an_over_long_demonstration_keeps_its_prompt_and_loses_the_reply_end(chat_lm) -> None:
    _, tok = chat_lm
    fmt = PromptFormat(tok, "chat")
    prompt = fmt.encode_prompt(QUESTION)
    [(ids, start)] = encode_pairs(fmt, [(QUESTION, "cold " * 40)], max_length=len(prompt) + 3)
    assert ids[:start] == prompt and len(ids) == len(prompt) + 3
    with pytest.raises(Exception, match="demonstration 1: its prompt has"):
        encode_pairs(fmt, [(QUESTION, "cold")], max_length=len(prompt))


def test_bos_is_handled_the_same_way_in_sft_and_sampling(plain_lm) -> None:
    """A Llama-style tokenizer that adds BOS: plain prompts get it once, in SFT and in the
    sampler alike, and responses never do."""
    _, tok = plain_lm
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)]
    )
    try:
        fmt = PromptFormat(tok, "plain")
        prompt, response = fmt.encode(QUESTION, "cold")
        assert prompt[0] == bos and prompt.count(bos) == 1
        # Here BOS and EOS are one token: the response has it once, as its closing EOS.
        assert response[-1] == tok.eos_token_id and bos not in response[:-1]
        [(ids, start)] = encode_pairs(fmt, [(QUESTION, "cold")], max_length=128)
        sampled, _ = pad_prompts(tok, [fmt.encode_prompt(QUESTION)])
        assert ids[:start] == prompt == sampled[0].tolist()
    finally:
        tok._tokenizer.post_processor = None


def test_stop_ids_are_the_union_of_eos_generation_config_and_template(chat_lm) -> None:
    model, tok = chat_lm
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert stop_token_ids(tok) == (tok.eos_token_id, im_end)
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]
    try:
        assert stop_token_ids(tok, model) == (tok.eos_token_id, 7, im_end)
    finally:
        model.generation_config.eos_token_id = [tok.eos_token_id, im_end]


def test_generation_stops_at_the_end_of_turn_token_and_decoding_drops_it(chat_lm) -> None:
    model, tok = chat_lm
    fmt = PromptFormat(tok, "chat", model=model)
    im_end = tok.convert_tokens_to_ids(IM_END)
    calls = []

    def force_end(module, args, output):  # the third response token is <|im_end|>
        calls.append(1)
        if len(calls) == 3:
            output.logits[..., im_end] = 1e9
        else:
            output.logits[..., list(fmt.stop_ids)] = -1e9
        return output

    handle = model.register_forward_hook(force_end)
    try:
        ids, mask = pad_prompts(tok, [fmt.encode_prompt(QUESTION)])
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=8,
            eos_token_id=fmt.stop_ids,
            pad_token_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert out.finished.tolist() == [True]
    assert out.response_ids.shape[1] == 3 and out.response_ids[0, 2].item() == im_end
    [text] = decode_responses(tok, out.response_ids, out.response_mask, fmt.stop_ids)
    assert IM_END not in text
    assert text == tok.decode(out.response_ids[0, :2].tolist()).removeprefix(" ")


def test_reward_model_re_renders_conversations_in_its_own_template(chat_lm, plain_lm) -> None:
    """The policy's prompt text is ChatML; a reward model with a plain tokenizer reads the
    same conversation in the plain format, one with a template in its template."""
    _, chat_tok = chat_lm
    _, plain_tok = plain_lm
    policy_text = PromptFormat(chat_tok, "chat").prompt_text(QUESTION)
    [(p, r)] = encode_parts(plain_tok, [policy_text], ["cold"], 96, [QUESTION])
    assert plain_tok.decode(p) == "User: What is the opposite of hot?\nAssistant:"
    assert plain_tok.decode(r) == f" cold{plain_tok.eos_token}"
    [(p, r)] = encode_parts(chat_tok, [policy_text], ["cold"], 96, [QUESTION])
    assert chat_tok.decode(p) == policy_text and chat_tok.decode(r) == f"cold{IM_END}"
    # Without conversations the prompt text is read as it is (the former behaviour).
    [(p, _)] = encode_parts(plain_tok, ["User: x\nAssistant:"], ["cold"], 96)
    assert plain_tok.decode(p) == "User: x\nAssistant:"


def test_tiny_models_of_every_architecture_load_with_auto_classes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for arch in ("llama", "qwen2", "mistral", "gemma", "gpt_neox", "gpt2"):
        out = build_tiny_causal_lm(
            tmp_path / arch, CORPUS, TinyArchSpec(arch=arch, vocab_size=300, hidden=64, heads=2)
        )
        model = AutoModelForCausalLM.from_pretrained(out)
        tok = AutoTokenizer.from_pretrained(out)
        assert model.config.model_type == arch
        assert PromptFormat(tok).chat
        assert tok.convert_tokens_to_ids(IM_END) in stop_token_ids(tok, model)


def test_a_local_judge_reads_its_prompt_in_its_own_chat_template(tmp_path: Path) -> None:
    from alignkit.judges.local import LocalJudge

    out = build_tiny_causal_lm(tmp_path / "judge", CORPUS, TinyArchSpec(vocab_size=400))
    judge = LocalJudge(str(out), max_critique_tokens=6)
    context = "Compare A and B.\nCritique:"
    assert judge.render(context) == f"{IM_START}user\n{context}{IM_END}\n{IM_START}assistant\n"
    ids, _ = judge._encode([judge.render(context)])
    bos = judge.tokenizer.bos_token_id
    assert ids[0].tolist().count(bos) == 0  # the template has no BOS, and none is added
    [verdict] = judge.critique([context], "\nVerdict:", ["A", "B"])
    assert set(verdict.option_logprobs) == {"A", "B"}
    assert IM_END not in verdict.text
    plain = LocalJudge(str(out), max_critique_tokens=6, template="plain")
    assert plain.render(context) == context


def test_generation_uses_the_current_cache_argument(chat_lm) -> None:
    """No deprecated ``past_key_values`` keyword on a model whose forward takes ``cache``, and
    the cached decode equals a full recompute."""
    import inspect
    import warnings

    from alignkit.models.generation import cache_argument

    model, tok = chat_lm
    takes_cache = "cache" in inspect.signature(model.forward).parameters
    assert cache_argument(model) == ("cache" if takes_cache else "past_key_values")
    fmt = PromptFormat(tok, "chat", model=model)
    ids, mask = pad_prompts(tok, [fmt.encode_prompt(QUESTION)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=5,
            eos_token_id=-1,
            pad_token_id=tok.pad_token_id,
            greedy=True,
            lean=False,
        )
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    full = torch.cat([ids, out.response_ids], dim=1)
    with torch.no_grad():
        logits = model(full).logits[0, ids.shape[1] - 1 : -1]
    assert logits.argmax(-1).tolist() == out.response_ids[0].tolist()


def test_batched_encoding_equals_row_by_row(chat_lm) -> None:
    """The batched encoders the rollout and the reward model use give each row's own ids,
    templated conversations and verbatim prompts mixed."""
    _, tok = chat_lm
    fmt = PromptFormat(tok, "chat")
    prompts = [QUESTION, "Q: hot?\nA:", [{"role": "user", "content": "plural of box?"}], QUESTION]
    responses = ["cold", "cold", " boxes ", ""]
    assert fmt.encode_prompts(prompts) == [fmt.encode_prompt(p) for p in prompts]
    want = [fmt.encode_response(p, r) for p, r in zip(prompts, responses, strict=True)]
    assert fmt.encode_responses(prompts, responses) == want
