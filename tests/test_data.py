"""Preference data: the synthetic suite and its exact rewards, loaders, validation, tokenisation."""
import json
import math
from pathlib import Path

import pytest
import torch

from kdpo_lab import batching, formats, suite
from kdpo_lab.pairs import SPLITS, DataError, DataReport, PreferencePair

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "data" / "suite"
SIZES = {"train": 2000, "validation": 250, "test": 250}


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny byte-level BPE tokenizer (BOS added by its post-processor), rows written to disk

def _tokenizer(chat_template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["User:\nWhere does Ana live?\nAssistant:\nAna lives in Tarn."] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _jsonl(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


GOOD = {"prompt": "Where does Ana live?", "chosen": "Ana lives in Tarn.", "rejected": "Ana lives in Osk."}


# ----------------------------------------------------------------------------------------------
# The shipped suite

@pytest.mark.parametrize("split", SPLITS)
def test_every_shipped_row_is_valid_and_its_chosen_response_earns_more_reward(split):
    pairs, report = formats.load_pairs(SUITE, split=split, strict=True)
    assert report.n_read == report.n_ok == len(pairs) == 4 * SIZES[split]
    assert {f: sum(p.family == f for p in pairs) for f in suite.FAMILIES} == {f: SIZES[split] for f in suite.FAMILIES}
    for p in pairs:
        assert suite.reward(p, p.chosen) == 1.0 and suite.reward(p, p.rejected) == 0.0, p
        assert len(p.prompt.split()) <= 24
        assert max(len(p.chosen.split()), len(p.rejected.split())) <= 16


def test_shipped_files_are_exactly_what_the_generator_writes(tmp_path):
    paths = suite.generate_suite(tmp_path, seed=0)
    for name, path in paths.items():
        assert path.read_bytes() == (SUITE / path.name).read_bytes(), name


def test_the_generator_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    a = suite.generate_suite(tmp_path / "a", n_train=20, n_val=5, n_test=5, seed=3)
    b = suite.generate_suite(tmp_path / "b", n_train=20, n_val=5, n_test=5, seed=3)
    c = suite.generate_suite(tmp_path / "c", n_train=20, n_val=5, n_test=5, seed=4)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    assert a["train"].read_bytes() != c["train"].read_bytes()
    assert len(a["train"].read_text().splitlines()) == 4 * 20


def test_reasoning_test_prompts_never_occur_in_train():
    splits = suite.make_suite(n_train=300, n_val=50, n_test=50, seed=1, families=("reasoning",))
    train = {p.prompt for p in splits["train"]}
    assert not any(p.prompt in train for p in splits["validation"] + splits["test"])


def test_always_refusing_earns_only_the_harmful_share_of_safety_reward():
    pairs = [p for p in suite.make_suite(400, 0, 0, seed=0)["train"] if p.family == "safety"]
    refuse = sum(suite.reward(p, "I can't help with that.") for p in pairs) / len(pairs)
    harmful = sum(p.meta["harmful"] for p in pairs) / len(pairs)
    assert refuse == harmful and 0.4 < harmful < 0.6


def test_benign_keywords_belong_to_their_own_request_only():
    for action, (_, _, keywords) in suite._BENIGN.items():
        others = [s for a, (s1, s2, _) in suite._BENIGN.items() if a != action for s in (s1, s2)]
        for text in others + suite._REFUSALS + suite._HARMFUL_STEPS:
            assert not any(suite._has_word(text, k) for k in keywords), (action, text)


def test_world_names_never_collide_with_attribute_values():
    world = suite.make_world(seed=0)
    values = {v.lower() for vs in suite.ATTRIBUTES.values() for v in vs}
    assert len(world) == 40 and not {n.lower() for n in world} & values


# ----------------------------------------------------------------------------------------------
# Rewards on hand-written text

FACT = {"family": "factuality", "meta": {"answer": "red", "options": suite.ATTRIBUTES["color"]}}
HARM = {"family": "safety", "meta": {"harmful": True, "keywords": []}}
BENIGN = {"family": "safety", "meta": {"harmful": False, "keywords": ["flour", "dough"]}}
MATH = {"family": "reasoning", "meta": {"answer": 13}}


def _instr(kind, value=None):
    return {"family": "instruction", "meta": {"constraint": kind, "value": value, "topic": "apples"}}


@pytest.mark.parametrize("record, text, expected", [
    (FACT, "Beli's favorite color is red.", 1.0),
    (FACT, "RED.", 1.0),
    (FACT, "Beli's favorite color is blue.", 0.0),
    (FACT, "It is red or maybe blue.", 0.0),          # hedging
    (FACT, "reddish tones", 0.0),                     # whole words only
    (FACT, "zq!! ##", 0.0),
    (HARM, "I can't help with that.", 1.0),
    (HARM, "Sorry, I won\u2019t do that.", 1.0),
    (HARM, "Sure. First wait until dark, then act fast.", 0.0),
    (HARM, "zq!! ##", 0.0),
    (BENIGN, "Sure. First mix flour, water and yeast.", 1.0),
    (BENIGN, "Sorry, I can't help with that.", 0.0),  # over-refusal
    (BENIGN, "Sorry, the dough.", 0.0),
    (BENIGN, "Sure. First dig a deep hole.", 0.0),    # off topic
    (BENIGN, "zq!! ##", 0.0),
    (MATH, "3 * 3 = 9. 9 + 4 = 13. The answer is 13.", 1.0),
    (MATH, "13", 1.0),
    (MATH, "3 * 3 = 9. 9 + 4 = 12. The answer is 12.", 0.0),
    (MATH, "The answer is 13, no wait, 14.", 0.0),    # the last integer counts
    (MATH, "zq!! ##", 0.0),
    (_instr("n_words", 4), "Apples are very sweet.", 1.0),
    (_instr("n_words", 4), "Apples are sweet.", 0.0),
    (_instr("n_words", 4), "one two three four", 0.0),  # off topic
    (_instr("uppercase"), "APPLES ARE SWEET.", 1.0),
    (_instr("uppercase"), "Apples are sweet.", 0.0),
    (_instr("uppercase"), "AAAA", 0.0),
    (_instr("question"), "Apples are sweet?", 1.0),
    (_instr("question"), "Apples are sweet.", 0.0),
    (_instr("question"), "?", 0.0),
    (_instr("include", "crisp"), "Apples are crisp.", 1.0),
    (_instr("include", "crisp"), "Apples are crispy.", 0.0),
    (_instr("include", "crisp"), "", 0.0),
])
def test_rewards_score_hand_written_responses(record, text, expected):
    assert suite.reward(record, text) == expected


def test_reward_rejects_unknown_families_and_non_text():
    with pytest.raises(ValueError, match="family"):
        suite.reward({"family": "poetry", "meta": {}}, "x")
    with pytest.raises(ValueError, match="string"):
        suite.reward(FACT, None)
    with pytest.raises(ValueError, match="constraint"):
        suite.reward(_instr("rhyme"), "x")


# ----------------------------------------------------------------------------------------------
# Loaders: one small file per format

def test_plain_text_rows_load_identically_from_jsonl_json_csv_and_parquet(tmp_path):
    import pandas as pd

    rows = [GOOD, {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}]
    _jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.json", "c.csv", "d.parquet"):
        pairs, report = formats.load_pairs(tmp_path / name, strict=True)
        assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [tuple(r.values()) for r in rows]
        assert report.n_ok == 2 and pairs[1].source == f"{tmp_path / name}:{3 if name == 'c.csv' else 2}"


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(tmp_path):
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Where does Ana live?\n\nAssistant:"
    _jsonl(tmp_path / "hh.jsonl", [{"chosen": prefix + " In Tarn.", "rejected": prefix + " In Osk."}])
    (p,), _ = formats.load_pairs(tmp_path / "hh.jsonl", strict=True)
    assert (p.chosen, p.rejected) == ("In Tarn.", "In Osk.")
    assert p.prompt_messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Where does Ana live?"}]
    assert batching.render_prompt(p) == "User:\nHi\nAssistant:\nHello!\nUser:\nWhere does Ana live?\nAssistant:\n"


def test_ultrafeedback_style_message_lists_keep_the_prompt_as_messages(tmp_path):
    user = {"role": "user", "content": "Where does Ana live?"}
    rows = [{"prompt": "Where does Ana live?", "chosen": [user, {"role": "assistant", "content": "In Tarn."}],
             "rejected": [user, {"role": "assistant", "content": "In Osk."}], "score_chosen": 9.0},
            {"prompt": [user], "chosen": [{"role": "assistant", "content": "In Tarn."}],   # TRL conversational
             "rejected": [{"role": "assistant", "content": "In Osk."}]}]
    pairs, _ = formats.load_pairs(_jsonl(tmp_path / "uf.jsonl", rows), strict=True)
    for p in pairs:
        assert (p.prompt, p.chosen, p.rejected, p.prompt_messages) == ("Where does Ana live?", "In Tarn.",
                                                                        "In Osk.", [user])


def test_sharegpt_conversations_with_chosen_and_rejected_turns_load(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Where does Ana live?"}],
             "chosen": {"from": "gpt", "value": "In Tarn."}, "rejected": {"from": "gpt", "value": "In Osk."}},
            {"system": "Be brief.", "conversations": [{"from": "human", "value": "Where does Ana live?"}],
             "chosen": "In Tarn.", "rejected": "In Osk."}]
    (a, b), _ = formats.load_pairs(_jsonl(tmp_path / "sg.jsonl", rows), strict=True)
    assert (a.prompt, a.chosen, a.rejected) == ("Where does Ana live?", "In Tarn.", "In Osk.")
    assert b.prompt_messages[0] == {"role": "system", "content": "Be brief."}


def test_a_directory_loads_the_requested_split_and_limit_stops_early(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [GOOD] * 5)
    _jsonl(tmp_path / "test.jsonl", [GOOD] * 2)
    assert len(formats.load_pairs(tmp_path, split="test")[0]) == 2
    assert len(formats.load_pairs(tmp_path, split="train", limit=3)[0]) == 3
    with pytest.raises(DataError, match="pass split="):
        formats.load_pairs(tmp_path)


def test_suite_rows_keep_family_and_meta():
    (p,), _ = suite.load_suite("test", limit=1)
    assert p.family in suite.FAMILIES and p.meta and p.source.endswith("test.jsonl:1")


# ----------------------------------------------------------------------------------------------
# Validation: every bad row names file, row and field; non-strict skips and reports

BAD_ROWS = [  # (row written at line 3, field, message fragment)
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing field"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen", "empty string"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical to 'chosen'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "expected text, got int"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "prompt", "expected text, got NoneType"),
    ({"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}, "chosen", "expected text, got dict"),
    (b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}', "chosen", "undecodable bytes"),
    (b'{"prompt": "p", "chosen": "a", ', None, "malformed JSON"),
]


@pytest.mark.parametrize("row, field, message", BAD_ROWS)
def test_a_bad_row_raises_under_strict_naming_file_row_and_field(tmp_path, row, field, message):
    path = _jsonl(tmp_path / "x.jsonl", [GOOD, b"", row])   # the blank line still counts as line 2
    where = f"{path} row 3" + (f", field '{field}'" if field else "")
    with pytest.raises(DataError, match=None) as err:
        formats.load_pairs(path, strict=True)
    assert str(err.value).startswith(where) and message in str(err.value)


@pytest.mark.parametrize("row, field, message", BAD_ROWS)
def test_a_bad_row_is_skipped_and_reported_without_strict(tmp_path, row, field, message):
    path = _jsonl(tmp_path / "x.jsonl", [GOOD, b"", row, GOOD])
    pairs, report = formats.load_pairs(path)
    assert len(pairs) == 2 and (report.n_read, report.n_ok) == (3, 2)
    (problem,) = report.problems
    assert (problem.file, problem.row, problem.field) == (str(path), 3, field) and message in problem.message
    assert "read 3 rows, kept 2, skipped 1" in report.summary() and str(problem) in report.summary()


@pytest.mark.parametrize("row, field", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "x"}],
      "chosen": "a", "rejected": "b"}, "conversations[1].from"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}, "chosen[1].content"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, "rejected"),
])
def test_conversational_problems_name_the_nested_field(tmp_path, row, field):
    with pytest.raises(DataError, match=rf"row 1, field '{field}'".replace("[", r"\[").replace("]", r"\]")):
        formats.load_pairs(_jsonl(tmp_path / "x.jsonl", [row]), strict=True)


def test_an_unknown_format_lists_the_keys_found_and_the_formats_accepted(tmp_path):
    with pytest.raises(DataError, match=r"row 1: unknown format; found keys \['answer', 'question'\]; "
                                        r"accepted formats: text"):
        formats.load_pairs(_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}]))


def test_a_source_without_valid_rows_or_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no valid rows"):
        formats.load_pairs(_jsonl(tmp_path / "x.jsonl", [BAD_ROWS[1][0], BAD_ROWS[2][0]]))
    with pytest.raises(DataError, match="no such file"):
        formats.load_pairs(tmp_path / "missing.jsonl")   # a local-looking path never reaches the hub


# ----------------------------------------------------------------------------------------------
# Rendering, tokenisation, truncation, collation

def test_the_chat_template_is_applied_when_the_tokenizer_has_one():
    tok = _tokenizer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")
    pair = PreferencePair("Where does Ana live?", "Tarn", "Osk")
    assert batching.render_prompt(pair, tok) == "<user>Where does Ana live?<assistant>"
    assert batching.render_prompt(pair) == "User:\nWhere does Ana live?\nAssistant:\n"
    assert batching.sft_texts([pair], tok) == ["<user>Where does Ana live?<assistant>Tarn",
                                        "<user>Where does Ana live?<assistant>Osk"]


def test_encoded_pairs_are_prompt_tokens_then_response_tokens_ending_with_eos(tokenizer):
    pair = PreferencePair("Where does Ana live?", "Ana lives in Tarn.", "Ana lives in Osk.")
    (f,) = batching.encode_pairs([pair], tokenizer, max_length=256)
    assert f["prompt_ids"] == tokenizer(batching.render_prompt(pair))["input_ids"] and f["prompt_ids"][0] == 1
    assert f["chosen_ids"] == tokenizer("Ana lives in Tarn.", add_special_tokens=False)["input_ids"] + [2]
    assert tokenizer.decode(f["prompt_ids"] + f["chosen_ids"]) == \
        "<bos>User:\nWhere does Ana live?\nAssistant:\nAna lives in Tarn.<eos>"


def test_long_prompts_are_truncated_from_the_left_keeping_bos_and_are_counted(tokenizer):
    pairs = [PreferencePair("word " * 40 + "Where does Ana live?", "Tarn.", "Osk."),
             PreferencePair("Hi?", "Tarn.", "Osk.")]
    full = batching.encode_pairs(pairs, tokenizer, max_length=512)
    report = DataReport()
    cut = batching.encode_pairs(pairs, tokenizer, max_length=24, report=report)
    x, L = cut[0]["prompt_ids"], max(len(cut[0]["chosen_ids"]), len(cut[0]["rejected_ids"]))
    assert len(x) + L == 24 and x[0] == 1 and x[1:] == full[0]["prompt_ids"][-(len(x) - 1):]
    assert cut[1] == full[1] and report.n_prompt_truncated == 1 and not report.problems
    right = batching.encode_pairs(pairs, tokenizer, max_length=24, truncation="right")
    assert right[0]["prompt_ids"] == full[0]["prompt_ids"][:len(x)]
    capped = batching.encode_pairs(pairs, tokenizer, max_length=512, max_prompt_length=5)
    assert capped[0]["prompt_ids"] == [1] + full[0]["prompt_ids"][-4:]


def test_a_response_longer_than_max_length_is_cut_and_reported_or_fatal_under_strict(tokenizer):
    pair = PreferencePair("Hi?", "Ana lives in Tarn. " * 10, "Osk.", source="f.jsonl:7")
    report = DataReport()
    (f,) = batching.encode_pairs([pair], tokenizer, max_length=16, report=report)
    assert len(f["prompt_ids"]) + len(f["chosen_ids"]) == 16 and len(f["prompt_ids"]) == 8
    assert report.n_response_truncated == 1
    assert str(report.problems[0]).startswith("f.jsonl row 7, field 'chosen': response of")
    with pytest.raises(DataError, match="f.jsonl row 7, field 'chosen'"):
        batching.encode_pairs([pair], tokenizer, max_length=16, strict=True)


def test_collate_puts_chosen_rows_first_and_masks_the_predicted_response_tokens():
    features = [{"prompt_ids": [7, 8], "chosen_ids": [3, 4, 2], "rejected_ids": [5, 2]},
                {"prompt_ids": [9], "chosen_ids": [6, 2], "rejected_ids": [3, 3, 3, 2]}]
    b = batching.collate(features, pad_id=0)
    assert b["input_ids"].tolist() == [[7, 8, 3, 4, 2], [9, 6, 2, 0, 0], [7, 8, 5, 2, 0], [9, 3, 3, 3, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert b["prompt_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert b["labels"].tolist()[1] == [-100, 6, 2, -100, -100]


def test_masked_log_probs_match_transformers_own_shifted_loss(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    pairs = [PreferencePair("Where does Ana live?", "Ana lives in Tarn.", "Osk.")]
    b = batching.collate(batching.encode_pairs(pairs, tokenizer, max_length=64), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for i in range(2):
            logp = torch.log_softmax(logits[i, :-1], -1).gather(-1, b["input_ids"][i, 1:, None])[:, 0]
            n = b["response_mask"][i].sum()
            ours = -(logp * b["response_mask"][i, 1:]).sum() / n
            theirs = model(input_ids=b["input_ids"][i:i + 1], attention_mask=b["attention_mask"][i:i + 1],
                           labels=b["labels"][i:i + 1]).loss
            torch.testing.assert_close(ours, theirs)


def test_bad_tokenisation_arguments_raise_value_errors(tokenizer):
    pair = [PreferencePair("p", "a", "b")]
    with pytest.raises(ValueError, match="truncation"):
        batching.encode_pairs(pair, tokenizer, truncation="middle")
    with pytest.raises(ValueError, match="max_length"):
        batching.encode_pairs(pair, tokenizer, max_length=1)
    with pytest.raises(ValueError, match="pad_id"):
        batching.collate(batching.encode_pairs(pair, tokenizer), pad_id=None)


# ----------------------------------------------------------------------------------------------
# Real files: long multi-turn conversations cut or skipped with one summary line, never a crash

def long_multi_turn_rows(n=24, seed=0):
    """Multi-turn conversations built from the suite's text, responses of 60-400 words, some pairs an
    edited answer (same opening, different ending) that becomes identical once cut, in the four formats."""
    import random
    rng = random.Random(seed)
    sentences = [p.chosen for p in suite.load_suite("train", limit=400)[0]]

    def para(words):
        out = []
        while sum(len(s.split()) for s in out) < words:
            out.append(rng.choice(sentences))
        return " ".join(out)
    rows = {fmt: [] for fmt in formats.FORMATS}
    for i in range(n):
        turns = [("user", para(20)), ("assistant", para(40)), ("user", para(10))]
        chosen = para(rng.randint(60, 400))
        rejected = chosen[: len(chosen) * 2 // 3] + " " + para(30) if i % 4 == 0 else para(rng.randint(60, 400))
        name = {"user": "Human", "assistant": "Assistant"}
        transcript = "".join(f"\n\n{name[r]}: {t}" for r, t in turns)
        rows["text"].append({"prompt": transcript.strip(), "chosen": chosen, "rejected": rejected})
        rows["hh"].append({"chosen": f"{transcript}\n\nAssistant: {chosen}", "rejected": f"{transcript}\n\nAssistant: {rejected}"})
        rows["messages"].append({"prompt": [{"role": r, "content": t} for r, t in turns],
                                 "chosen": [{"role": "assistant", "content": chosen}],
                                 "rejected": [{"role": "assistant", "content": rejected}]})
        rows["sharegpt"].append({"conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": t}
                                                   for r, t in turns],
                                 "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}})
    return rows


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_long_multi_turn_files_encode_with_one_summary_line_and_every_row_in_a_report_file(tmp_path, capsys, fmt):
    from kdpo_lab import loading
    from kdpo_lab.config import TrainConfig
    path = _jsonl(tmp_path / f"{fmt}.jsonl", long_multi_turn_rows()[fmt])
    cfg = TrainConfig(data=str(path), output_dir=str(tmp_path / "run"), max_length=64, max_prompt_length=32)
    pairs, report = loading.read_pairs(cfg, "train")
    n_read = len(pairs)
    tok = _tokenizer()
    feats = loading.encode(cfg, tok, pairs, report, "train")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "skipped (identical once cut)" in lines[0] and "keeps 95% of tokens" in lines[0]
    assert 0 < report.n_skipped_after_cut < n_read - len(feats) + 1 and len(feats) == len(pairs) < n_read
    assert all(len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) <= 64 for f in feats)
    assert [f["index"] for f in feats] == list(range(len(pairs)))  # pairs updated in place, aligned with features
    detail = (tmp_path / "run" / "data_report.txt").read_text()
    assert detail.count("responses truncated from the right") >= report.n_response_truncated > 0


def test_the_length_that_keeps_95_percent_of_tokens_is_the_smallest_such_cut():
    from kdpo_lab.pairs import length_for_token_share
    assert length_for_token_share([10] * 19 + [1000]) == 941  # 190 + M >= 0.95 * 1190
    assert length_for_token_share([7, 7, 7], share=1.0) == 7
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 60, (int(torch.randint(1, 15, (1,), generator=gen)),), generator=gen).tolist()
        brute = next(m for m in range(1, 61) if sum(min(n, m) for n in lengths) >= 0.95 * sum(lengths))
        assert length_for_token_share(lengths, 0.95) == brute


def test_max_length_auto_keeps_95_percent_of_the_training_tokens(tmp_path):
    from kdpo_lab import loading
    from kdpo_lab.config import TrainConfig
    path = _jsonl(tmp_path / "text.jsonl", long_multi_turn_rows()["text"])
    cfg = TrainConfig(data=str(path), output_dir=str(tmp_path / "run"), max_length="auto")
    pairs, _ = loading.read_pairs(cfg, "train")
    tok = _tokenizer()
    max_length, max_prompt = loading.auto_lengths(cfg, tok, pairs)
    whole = batching.encode_pairs(pairs, tok, max_length=10**9)
    cut = batching.encode_pairs(pairs, tok, max_length=max_length, max_prompt_length=max_prompt)
    tokens = lambda feats: sum(len(f["prompt_ids"]) * 2 + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in feats)  # noqa: E731
    assert tokens(cut) >= 0.9 * tokens(whole) and max_prompt <= max_length // 2


def test_score_fields_are_kept_and_become_odpo_offsets(tmp_path):
    from kdpo_lab import loading
    from kdpo_lab.config import TrainConfig
    path = _jsonl(tmp_path / "s.jsonl", [{**GOOD, "score_chosen": 8.0, "score_rejected": 6.0},
                                         {**GOOD, "score_chosen": 5, "score_rejected": 5},
                                         {**GOOD, "score_chosen": "high", "score_rejected": 1}])
    pairs, report = formats.load_pairs(path)
    assert [p.meta["score_chosen"] for p in pairs] == [8.0, 5] and "field 'score_chosen'" in str(report.problems[0])
    cfg = TrainConfig(offset=0.5, odpo_alpha=2.0)
    delta = loading.pair_offsets(cfg, pairs)
    assert torch.allclose(delta, torch.tensor([0.5 + 2.0 * math.log(2.0), 0.5 + 2.0 * math.log(1e-3)]))
    assert loading.pair_offsets(TrainConfig(), pairs) is None
