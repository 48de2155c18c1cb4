"""Vicuna v1.1 SFT: the chat template against FastChat's rules, assistant masks, configs and recipes,
bad input, the `reflectune sft` job (`cli.sft_job`), and real CPU runs of its wrapper scripts/sft.py and of
TRL's own `trl sft` CLI."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reflectune_hf.cli import sft_job
from reflectune_hf.data import ColumnError, read_records, sample_path
from reflectune_hf.prompts import SCORING_TEMPLATES, VICUNA_SYSTEM
from reflectune_hf.training.sft import (
    batch_size_fields,
    chat_template_path,
    check_sft_dataset,
    resolve_chat_template_path,
    to_messages,
    vicuna_chat_template,
    vicuna_sft_config,
    vicuna_sft_trainer,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "scripts" / "configs"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}


def fastchat_vicuna_prompt(messages, add_generation_prompt=False, sep2="</s>"):
    """FastChat's `vicuna_v1.1` conversation, restated from its rules (SeparatorStyle.ADD_COLON_TWO):
    the system message (default the Vicuna one), then sep " "; each turn is "ROLE: message" followed by
    sep " " after a user turn and sep2 "</s>" after an assistant turn, or the bare "ROLE:" when the
    message is empty or None; the generation prompt is an appended assistant turn with no message."""
    system = VICUNA_SYSTEM
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    turns = [("USER" if m["role"] == "user" else "ASSISTANT", m["content"]) for m in messages]
    if add_generation_prompt:
        turns.append(("ASSISTANT", None))
    seps = (" ", sep2)
    text = system + seps[0]
    for i, (role, message) in enumerate(turns):
        text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return text


def render(messages, add_generation_prompt=False, **special_tokens):
    """The packaged template rendered by transformers' own renderer, without any tokenizer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=vicuna_chat_template(),
                                        add_generation_prompt=add_generation_prompt, **special_tokens)
    return rendered[0]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "single": [user("Hi"), assistant("Hello.")],
    "multi": [user("Hi"), assistant("Hello."), user("Who are you?"), assistant("I am ...")],
    "system": [{"role": "system", "content": "You are terse."}, user("Add 2+2."), assistant("4")],
    "empty-system": [{"role": "system", "content": ""}, user("Add 2+2."), assistant("4")],
    "input-unicode": [user("Translate.\nInput:\nCafé — naïve"), assistant("Kaffee: naiv\n\n- done")],
    "ends-with-user": [user("Hi"), assistant("Hello."), user("And?")],
}


def llama_tokenizer(legacy=True):
    """A real Llama-family tokenizer (transformers' LlamaTokenizer: byte-fallback BPE, Metaspace,
    <s> added as BOS, </s> as EOS) with a small vocabulary trained here on the bundled sample.
    `legacy=True` prefixes "▁" to every text segment, also after a special token (sentencepiece's
    behaviour, which FastChat trained with); `legacy=False` only to the start of the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    rows = read_records(sample_path())
    corpus = [" ".join((r["instruction"], r["input"], r["output"])) for r in rows] + [VICUNA_SYSTEM + " USER: ASSISTANT:"]
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=900, special_tokens=special, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=merges, legacy=legacy, add_bos_token=True)
    tokenizer.chat_template = vicuna_chat_template()
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir):
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(smollm2_dir)
    smol.chat_template = vicuna_chat_template()
    return {"llama": llama_tokenizer(), "llama-nonlegacy": llama_tokenizer(legacy=False), "smollm2": smol}


# ---------------------------------------------------------------------------------------------
# The template: byte equality with FastChat's rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_template_renders_fastchat_bytes(name, generation_prompt):
    messages = CONVERSATIONS[name]
    if generation_prompt and messages[-1]["role"] == "assistant":
        messages = messages + [user("One more?")]
    expected = fastchat_vicuna_prompt(messages, add_generation_prompt=generation_prompt)
    assert render(messages, generation_prompt, eos_token="</s>") == expected
    # With a BOS token, exactly that token comes first and nothing else changes.
    assert render(messages, generation_prompt, eos_token="</s>", bos_token="<s>") == "<s>" + expected


def test_template_matches_the_published_example():
    text = render(CONVERSATIONS["multi"], eos_token="</s>")
    assert text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello.</s>USER: Who are you? "
        "ASSISTANT: I am ...</s>"
    )


def test_template_prompt_equals_the_vicuna_scoring_template(sample):
    """The training prompt is the IFD scoring prompt, with and without input (same system text)."""
    assert VICUNA_SYSTEM in vicuna_chat_template()
    with_input = [row for row in sample if row["input"]][:3]
    without = [row for row in sample if not row["input"]][:3]
    assert with_input and without
    for row in with_input + without:
        prompt = to_messages(row)["messages"][:1]
        assert render(prompt, True, eos_token="</s>") == SCORING_TEMPLATES["vicuna"].format(row["instruction"], row["input"])


def test_template_rejects_roles_that_do_not_alternate():
    from jinja2.exceptions import TemplateError

    for messages in ([user("a"), user("b")], [assistant("a")], [user("a"), {"role": "tool", "content": "x"}]):
        with pytest.raises(TemplateError, match="alternate"):
            render(messages, eos_token="</s>")


# ---------------------------------------------------------------------------------------------
# Tokens: one BOS for Llama, FastChat's token ids, the assistant mask
# ---------------------------------------------------------------------------------------------


def assistant_spans(messages, eos):
    """Character spans of ' ' + answer + eos for each assistant turn, in the FastChat text."""
    spans, text = [], ""
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            before = fastchat_vicuna_prompt(messages[:k], add_generation_prompt=True, sep2=eos)
            spans.append((len(before), len(before) + len(" " + message["content"] + eos)))
    return spans


@pytest.mark.parametrize("kind", ["llama", "llama-nonlegacy", "smollm2"])
@pytest.mark.parametrize("name", ["single", "multi", "system", "input-unicode"])
def test_assistant_mask_is_exactly_answer_plus_eos(tokenizers, kind, name):
    tok = tokenizers[kind]
    messages = CONVERSATIONS[name]
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == tok.bos_token + fastchat_vicuna_prompt(messages, sep2=tok.eos_token)

    # Exactly one BOS, first. With a legacy Llama tokenizer these are exactly the ids FastChat trains on
    # (its text, BOS added by the tokenizer); a non-legacy one writes the first system token without "▁".
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    plain = fastchat_vicuna_prompt(messages, sep2=tok.eos_token)
    if kind == "llama":
        assert ids == tok(plain).input_ids
    elif kind == "llama-nonlegacy":
        assert tok.convert_ids_to_tokens(tok(plain).input_ids[1])[0] == "▁" != tok.convert_ids_to_tokens(ids[1])[0]
    else:  # SmolLM2 adds no BOS to plain text: the template's is the only one
        assert ids == [tok.bos_token_id] + tok(plain).input_ids

    # The mask covers exactly the tokens of ' ' + answer + eos of every turn, and these tokens tile the span.
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    shift = len(tok.bos_token)
    spans = [(a + shift, b + shift) for a, b in assistant_spans(messages, tok.eos_token)]
    expected = [int(any(a <= start and end <= b for a, b in spans)) for start, end in offsets]
    assert mask == expected
    for a, b in spans:
        covered = [(s, e) for (s, e), m in zip(offsets, mask) if m and a <= s < b]
        assert covered[0][0] == a and covered[-1][1] == b
        assert text[a:b].startswith(" ") and text[a:b].endswith(tok.eos_token)
    if kind == "smollm2":  # its decoder keeps spaces, so the trained text reads back exactly
        answers = [" " + m["content"] + tok.eos_token for m in messages if m["role"] == "assistant"]
        trained = [tok.decode([i for i, (s, _), m in zip(ids, offsets, mask) if m and a <= s < b]) for a, b in spans]
        assert trained == answers


def test_trl_stop_token_check_passes(tokenizers):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    for tok in tokenizers.values():
        assert tok.chat_template == vicuna_chat_template()
        assert has_generation_markers(tok.chat_template)
        assert is_chat_template_stop_token_trained(tok)


def test_trl_labels_train_only_answer_and_eos(tmp_path, sample, smollm2_dir):
    """Through SFTTrainer's own preparation: labels are -100 everywhere but ' ' + output + EOS."""
    ds = sample.select(range(6))
    args = vicuna_sft_config(tmp_path / "out", max_length=512, max_steps=1, per_device_train_batch_size=2,
                             gradient_accumulation_steps=1, activation_checkpointing=False, use_cpu=True,
                             report_to="none")
    trainer = vicuna_sft_trainer("smollm2-135m-instruct", ds, args, dataset_name="sample")
    tok = trainer.processing_class
    assert tok.chat_template == vicuna_chat_template()
    for row, prepared in zip(ds, trainer.train_dataset):
        ids, labels = prepared["input_ids"], prepared["labels"]
        messages = to_messages(row)["messages"]
        prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
        assert ids[: len(prompt)] == prompt and set(labels[: len(prompt)]) == {-100}
        assert labels[len(prompt):] == ids[len(prompt):]  # everything after "ASSISTANT:" is trained
        assert tok.decode(ids[len(prompt):]) == " " + row["output"] + tok.eos_token
        assert tok.decode(ids) == tok.bos_token + fastchat_vicuna_prompt(messages, sep2=tok.eos_token)

    card = str(trainer.model_card())
    assert "smollm2-135m-instruct" in card and "sample" in card and "vicuna_v1.1" in card
    assert "| learning rate | 2e-05 |" in card and "assistant tokens only" in card
    assert str(tmp_path) not in card and smollm2_dir not in card  # no local paths in cards
    (tmp_path / "rows.jsonl").write_text("{}")
    relative = os.path.relpath(tmp_path / "rows.jsonl")  # a relative path is a local path too
    card = str(trainer.model_card(dataset_name=relative))
    assert "rows.jsonl (local file)" in card and relative not in card and "datasets:" not in card.split("---")[1]
    trainer.create_model_card(dataset_name="my-org/recycled")  # what push_to_hub calls: our card, not TRL's
    pushed = (Path(args.output_dir) / "README.md").read_text()
    assert "Reflection-Tuning" in pushed and "- my-org/recycled" in pushed.split("---")[1]


def test_llama_model_gets_one_bos_through_trl(tmp_path, sample):
    """A (tiny, random) Llama model with a Llama tokenizer: TRL's prepared ids start with one BOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    args = vicuna_sft_config(tmp_path / "out", max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                             activation_checkpointing=False, use_cpu=True, report_to="none")
    trainer = vicuna_sft_trainer(LlamaForCausalLM(config), sample.select(range(4)), args, processing_class=tok)
    for row, prepared in zip(sample.select(range(4)), trainer.train_dataset):
        ids = prepared["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids == tok(fastchat_vicuna_prompt(to_messages(row)["messages"])).input_ids
        prompt = tok(fastchat_vicuna_prompt(to_messages(row)["messages"][:1], add_generation_prompt=True)).input_ids
        assert ids[: len(prompt)] == prompt and set(prepared["labels"][: len(prompt)]) == {-100}
        assert prepared["labels"][len(prompt):] == ids[len(prompt):] and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[len(prompt):]) == row["output"] + "</s>"  # Llama's decoder drops the leading space


# ---------------------------------------------------------------------------------------------
# Data: to_messages and bad input
# ---------------------------------------------------------------------------------------------


def test_to_messages_rows_and_batches(sample):
    row = next(r for r in sample if r["input"])
    single = to_messages(row)["messages"]
    assert single == [user(f"{row['instruction']}\nInput:\n{row['input']}"), assistant(row["output"])]
    mapped = sample.map(to_messages, batched=True, batch_size=7)
    assert mapped["messages"] == sample.map(to_messages)["messages"]
    assert mapped.column_names == sample.column_names + ["messages"]
    with_system = to_messages({"instruction": "a", "input": None, "output": "b"}, system="Be brief.")["messages"]
    assert with_system == [{"role": "system", "content": "Be brief."}, user("a"), assistant("b")]


def test_system_reaches_a_messages_dataset_too():
    """`system=` was dropped for a `messages` dataset, so for every reflectune output folder (all
    carry `messages`): the model trained on the Vicuna system prompt instead of the one asked for."""
    from datasets import Dataset

    from reflectune_hf.training.sft import prepare_sft_dataset

    ds = Dataset.from_dict({"instruction": ["a"], "output": ["b"], "messages": [[user("a"), assistant("b")]]})
    assert prepare_sft_dataset(ds, system="Be brief.")["messages"] == [
        [{"role": "system", "content": "Be brief."}, user("a"), assistant("b")]]
    assert prepare_sft_dataset(ds)["messages"] == [[user("a"), assistant("b")]]
    own = Dataset.from_dict({"messages": [[{"role": "system", "content": "Mine."}, user("a"), assistant("b")]]})
    with pytest.raises(ValueError, match="system message of its own"):
        prepare_sft_dataset(own, system="Be brief.")


def test_a_rows_own_system_prompt_trains_and_publishes(tmp_path):
    """TRL data with a system turn loads with a `system` column, but `to_messages` (SFT and the
    published `messages`) ignored it: the rows trained with the Vicuna system prompt, silently."""
    from reflectune_hf.data import load_data
    from reflectune_hf.publishing.hub import with_messages
    from reflectune_hf.training.sft import prepare_sft_dataset

    path = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, user("Name a colour."), assistant("Blue.")]
    path.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": turns[1:]}) + "\n")
    ds = load_data(str(path))
    expected = [turns, turns[1:]]
    assert to_messages(ds[0])["messages"] == turns
    assert prepare_sft_dataset(ds)["messages"] == expected
    assert with_messages(ds)["messages"] == expected
    with pytest.raises(ValueError, match="system prompt of its own"):
        prepare_sft_dataset(ds, system="Be long.")
    with pytest.raises(ColumnError, match="non-string system"):
        to_messages({"instruction": "a", "output": "b", "system": 3})


def test_to_messages_names_the_bad_row():
    with pytest.raises(ValueError, match=r"id=7 has an empty output"):
        to_messages({"id": 7, "instruction": "a", "input": "", "output": "  "})
    with pytest.raises(ValueError, match=r"id=2 has an empty instruction"):
        to_messages({"id": [1, 2], "instruction": ["a", ""], "input": ["", ""], "output": ["b", "c"]})
    with pytest.raises(ColumnError, match=r"\['output'\]"):
        to_messages({"instruction": "a"})


def test_bad_input_fails_before_any_model_loads(sample):
    from datasets import Dataset

    missing = sample.remove_columns("output")
    with pytest.raises(ColumnError, match=r"needs the column\(s\) \['output'\]"):
        vicuna_sft_trainer("no-such-org/no-such-model", missing, vicuna_sft_config("out"))
    empty = sample.select(range(5)).map(lambda r: {"output": "" if r["id"] in (1, 3) else r["output"]})
    with pytest.raises(ValueError, match=r"2 of 5 rows cannot be trained on: id=1: empty output; id=3: empty output"):
        vicuna_sft_trainer("no-such-org/no-such-model", empty, vicuna_sft_config("out"))
    bad_messages = Dataset.from_dict({"messages": [
        [user("a"), assistant("b")],
        [user("a"), user("b")],
        [user("a"), assistant(" ")],
        [user("a")],
    ]})
    with pytest.raises(ValueError, match=r"3 of 4 rows.*row 1: message 1 has role 'user'.*row 2: an empty output.*row 3: no assistant turn"):
        check_sft_dataset(bad_messages)
    check_sft_dataset(bad_messages.select([0]))
    with pytest.raises(TypeError, match=r"pass one split"):
        check_sft_dataset(sample.train_test_split(0.5))
    lists = Dataset.from_dict({"instruction": ["a", "b"], "output": [["x"], ["y"]]})
    with pytest.raises(ValueError, match=r"row 0: non-string output"):
        check_sft_dataset(lists)
    with pytest.raises(ValueError, match=r"vicuna_sft: the data has no rows, nothing can be trained on"):
        vicuna_sft_trainer("no-such-org/no-such-model", sample.select([]), vicuna_sft_config("out"))
    with pytest.raises(ValueError, match=r"no model to train.*--model_name_or_path"):
        vicuna_sft_trainer(None, sample, vicuna_sft_config("out"))
    with pytest.raises(ValueError, match=r"reflect: 2 of 5 rows cannot be recycled"):
        check_sft_dataset(empty, stage="reflect", purpose="recycled")


# ---------------------------------------------------------------------------------------------
# Config and recipes
# ---------------------------------------------------------------------------------------------


def test_vicuna_sft_config_has_the_paper_recipe(tmp_path):
    import torch

    args = vicuna_sft_config(tmp_path, world_size=1)
    assert (args.learning_rate, args.num_train_epochs, args.max_length) == (2e-5, 3, 2048)
    assert (args.warmup_steps, args.weight_decay, args.lr_scheduler_type.value) == (0.03, 0.0, "cosine")
    assert args.assistant_only_loss and not args.packing
    assert args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # bf16 on a GPU, fp32 on CPU
    assert Path(args.chat_template_path) == chat_template_path()
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 32)
    assert vicuna_sft_config(tmp_path, world_size=8).gradient_accumulation_steps == 4
    assert vicuna_sft_config(tmp_path, world_size=2, per_device_train_batch_size=16).gradient_accumulation_steps == 4
    assert vicuna_sft_config(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=5).gradient_accumulation_steps == 5
    assert vicuna_sft_config(tmp_path, global_batch_size=16, world_size=1).gradient_accumulation_steps == 4
    with pytest.raises(ValueError, match="not a multiple"):
        vicuna_sft_config(tmp_path, per_device_train_batch_size=3, world_size=1)
    assert resolve_chat_template_path(None) == resolve_chat_template_path("elsewhere/vicuna_v1.1.jinja") == str(chat_template_path())
    assert resolve_chat_template_path("my/own.jinja") == "my/own.jinja"
    assert batch_size_fields(128, 4, world_size=8) == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}


@pytest.mark.parametrize("recipe,lr,gpus", [("vicuna_7b.yaml", 2e-5, 8), ("vicuna_13b.yaml", 1e-5, 8)])
def test_paper_recipes_parse_with_trl_and_give_global_batch_128(tmp_path, recipe, lr, gpus):
    from trl.scripts.sft import make_parser as trl_make_parser

    argv = ["--config", str(CONFIGS / recipe), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    for parser in (trl_make_parser(), sft_job.make_parser()):  # TRL's own parser rejects unknown keys
        script_args, args, model_args, _ = parser.parse_args_and_config(argv)
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps * gpus == 128
        assert (args.learning_rate, args.num_train_epochs, args.max_length, args.warmup_steps) == (lr, 3, 2048, 0.03)
        assert (args.weight_decay, args.lr_scheduler_type.value, args.assistant_only_loss) == (0.0, "cosine", True)
        assert (REPO / args.chat_template_path).read_text() == vicuna_chat_template()
        assert model_args.model_name_or_path.startswith("meta-llama/Llama-2-")


def test_script_defaults_are_the_paper_recipe(tmp_path):
    _, args, _, _ = sft_job.make_parser().parse_args_and_config(["--output_dir", str(tmp_path)])
    assert (args.learning_rate, args.num_train_epochs, args.max_length, args.warmup_steps) == (2e-5, 3, 2048, 0.03)
    assert args.assistant_only_loss and args.lr_scheduler_type.value == "cosine"
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 128
    assert Path(args.chat_template_path) == chat_template_path()


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    options = {s for action in launch_command_parser()._actions for s in action.option_strings}
    kinds = {}
    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
        kinds[path.stem] = config.distributed_type.value
        nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
        assert all(f"--{key}" in options for key in nested), path
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}
    assert yaml.safe_load((CONFIGS / "accelerate" / "zero3.yaml").read_text())["deepspeed_config"]["zero_stage"] == 3


def test_script_loads_sample_disk_and_files(tmp_path, sample):
    from trl import DatasetMixtureConfig, ScriptArguments

    script = sft_job
    sample.select(range(3)).save_to_disk(str(tmp_path / "disk"))
    sample.select(range(2)).to_json(str(tmp_path / "rows.jsonl"))
    for name, rows in (("sample", 40), (str(tmp_path / "disk"), 3), (str(tmp_path / "rows.jsonl"), 2)):
        assert len(script.load_datasets(ScriptArguments(dataset_name=name), DatasetMixtureConfig())["train"]) == rows
    mixture = DatasetMixtureConfig(datasets=[{"path": "json", "data_files": str(tmp_path / "rows.jsonl")}])
    assert script.dataset_label(ScriptArguments(), mixture) == "json (rows.jsonl)"


def test_script_rejects_bad_data_before_loading_the_model(tmp_path):
    rows = read_records(sample_path())[:4]
    rows[2]["output"] = ""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = sft_job
    parsed = script.make_parser().parse_args_and_config([
        "--model_name_or_path", "no-such-org/no-such-model", "--dataset_name", str(data),
        "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"])
    with pytest.raises(ValueError, match=r"1 of 4 rows cannot be trained on: row 2: empty output"):
        script.run_sft(*parsed)


# ---------------------------------------------------------------------------------------------
# Real runs (subprocesses)
# ---------------------------------------------------------------------------------------------


def run(cmd, tmp_path, name):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / f"{name}.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def check_output_dir(out: Path, tokenizer_bos="<|im_start|>"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (out / "chat_template.jinja").read_text() == vicuna_chat_template()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    messages = CONVERSATIONS["multi"][:3]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer_bos + fastchat_vicuna_prompt(messages, add_generation_prompt=True, sep2=tok.eos_token))
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_smoke_recipe_trains_on_cpu(tmp_path):
    out = tmp_path / "smoke"
    run([sys.executable, "scripts/sft.py", "--config", "scripts/configs/smoke_cpu.yaml", "--output_dir", str(out)],
        tmp_path, "smoke")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert losses[4] < losses[0]  # step 5 trains on step 1's batch again (sequential sampling, 4 steps an epoch)
    check_output_dir(out)
    card = (out / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # an embedded alias is not a Hub id
    for needle in ("smollm2-135m-instruct", "vicuna_v1.1", "| learning rate | 0.0001 |", "16 rows", "USER: Hi ASSISTANT:"):
        assert needle in card


@pytest.mark.slow
def test_saved_dataset_trains_unchanged_with_trl_cli(tmp_path, sample, smollm2_dir):
    """What `save_local` writes (and `push_to_hub` publishes: the same parquet files and card) trains
    with TRL's own `trl sft` and our YAML, untouched: the folder as `dataset_name`, read through the
    splits its README card declares, and its parquet file as a `datasets:` entry."""
    from reflectune_hf.publishing.hub import save_local
    from reflectune_hf.reflection.variants import build_variants

    from scripted_oracle import demo_oracle

    variants = build_variants(sample.select(range(16)), demo_oracle(), batch_size=16)
    out = save_local(variants, tmp_path / "published", card_context={"source_dataset": "sample"})
    config = yaml.safe_load((CONFIGS / "smoke_cpu.yaml").read_text())
    config.pop("datasets")
    config.update(
        model_name_or_path=smollm2_dir,  # TRL knows no embedded aliases: the converted directory
        dataset_name=str(out), dataset_train_split="reflect_both",
        output_dir=str(tmp_path / "trl-out"), max_steps=1, gradient_accumulation_steps=1,
    )
    assert config["assistant_only_loss"] is True and config["chat_template_path"].endswith("vicuna_v1.1.jinja")
    (tmp_path / "trl.yaml").write_text(yaml.safe_dump(config))
    trl = Path(sys.executable).with_name("trl")
    log = run([str(trl), "sft", "--config", str(tmp_path / "trl.yaml")], tmp_path, "trl")
    losses = [float(x) for x in re.findall(r"'loss': '?([0-9.eE+-]+|nan|inf)'?", log)]
    assert losses and all(math.isfinite(x) for x in losses)
    check_output_dir(tmp_path / "trl-out")

    config.pop("dataset_name"), config.pop("dataset_train_split")
    config.update(datasets=[{"path": "parquet", "data_files": str(out / "data" / "origin-00000-of-00001.parquet")}],
                  output_dir=str(tmp_path / "trl-out-parquet"))
    (tmp_path / "trl-parquet.yaml").write_text(yaml.safe_dump(config))
    log = run([str(trl), "sft", "--config", str(tmp_path / "trl-parquet.yaml")], tmp_path, "trl-parquet")
    losses = [float(x) for x in re.findall(r"'loss': '?([0-9.eE+-]+|nan|inf)'?", log)]
    assert losses and all(math.isfinite(x) for x in losses)


def test_sft_script_trains_a_reflectune_output_folder(tmp_path, sample, smollm2_dir):
    """`scripts/sft.py --dataset_name <reflectune output>` finds `arrow/` and, with no `train`
    split, the `selected` one; a split that is not there is a clear error before the model loads."""
    from datasets import DatasetDict
    from trl import DatasetMixtureConfig, ScriptArguments

    from reflectune_hf.publishing.hub import save_local

    script = sft_job
    rows = sample.select(range(8))
    out = save_local(DatasetDict({"origin": rows, "selected": rows.select(range(4))}), tmp_path / "out")
    data = script.load_datasets(ScriptArguments(dataset_name=str(out)), DatasetMixtureConfig())
    assert set(data) == {"origin", "selected"} and len(data["selected"]) == 4
    assert script.train_split(data, "train") == "selected" and script.train_split(data, "origin") == "origin"
    with pytest.raises(ValueError, match=r"no split 'nope', only \['origin', 'selected'\]"):
        script.train_split(data, "nope")


def test_card_counts_the_rows_trained_not_those_trl_dropped(tmp_path, caplog):
    """A row whose prompt alone fills max_length is dropped by TRL: the card counts the rows that
    train, and says how many were dropped."""
    from datasets import Dataset

    ds = Dataset.from_dict({"instruction": ["Say hi.", "word " * 200, "Q"], "input": ["", "", ""],
                            "output": ["Hi!", "ok", "A"]})
    args = vicuna_sft_config(tmp_path / "out", max_length=64, max_steps=1, per_device_train_batch_size=1,
                             gradient_accumulation_steps=1, activation_checkpointing=False, use_cpu=True,
                             report_to="none")
    trainer = vicuna_sft_trainer("smollm2-135m-instruct", ds, args, dataset_name="my-org/data")
    assert len(trainer.train_dataset) == 2
    card = str(trainer.model_card())
    assert "(2 rows" in card and "(3 rows)" not in card and "1 dropped" in card


def test_rows_not_really_reflected_are_trained_with_a_warning(caplog):
    """Rows whose reflection failed keep their previous pair and train; the count says so."""
    from datasets import Dataset

    from reflectune_hf.training.sft_data import prepare_sft_dataset

    ds = Dataset.from_dict({"instruction": ["a", "b", "c", "d"], "output": ["w", "x", "y", "z"],
                            "reflection_status": ["ok", "oracle_error", "failed", "ok"]})
    with caplog.at_level("WARNING", logger="reflectune_hf.training.sft_data"):
        assert len(prepare_sft_dataset(ds)) == 4  # kept, never dropped
    assert "2 of 4 rows were not really reflected" in caplog.text and "'oracle_error': 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="reflectune_hf.training.sft_data"):
        prepare_sft_dataset(ds.map(lambda r: {"reflection_status": ""}))  # origin: nothing reflected, no warning
    assert "not really reflected" not in caplog.text


def test_sft_eval_without_the_test_split_is_a_clear_error(tmp_path):
    """`--eval_strategy steps` on data without the `dataset_test_split` split: one line naming the
    split, the splits there are and the flag, before the model loads (it was `KeyError: 'test'`)."""
    args = sft_job.make_parser().parse_args_and_config(
        ["--model_name_or_path", "smollm2-135m-instruct", "--dataset_name", "sample", "--output_dir",
         str(tmp_path / "out"), "--eval_strategy", "steps", "--use_cpu", "true", "--report_to", "none"])
    with pytest.raises(ValueError, match=r"no split 'test' to evaluate on, only \['train'\].*--dataset_test_split"):
        sft_job.run_sft(*args)


def tiny_llama():
    """A tiny random Llama and the Llama tokenizer trained here: a trainer without any weights to load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return LlamaForCausalLM(config), tok


def test_packed_rows_are_not_counted_as_dropped(tmp_path, sample, caplog):
    """With `packing=True` TRL packs rows into fewer sequences and drops none: the card counted the
    packed sequences as the rows trained and said the rest were dropped (and so did a warning)."""
    model, tok = tiny_llama()
    args = vicuna_sft_config(tmp_path / "out", max_length=512, packing=True, max_steps=1, per_device_train_batch_size=1,
                             gradient_accumulation_steps=1, activation_checkpointing=False, use_cpu=True,
                             report_to="none")
    with caplog.at_level("WARNING", logger="reflectune_hf.training.sft"):
        trainer = vicuna_sft_trainer(model, sample.select(range(8)), args, processing_class=tok, dataset_name="me/d")
    assert len(trainer.train_dataset) < 8  # packed
    card = str(trainer.model_card())
    assert "(8 rows" in card and "dropped" not in card and "dropped" not in caplog.text


def test_a_system_message_without_text_is_refused_before_training():
    """A system message whose content is null passed the check, then failed deep in TRL's tokenizing
    (jinja2 UndefinedError: 'dict object' has no attribute 'content')."""
    from datasets import Dataset

    turns = [user("a"), assistant("b")]
    ds = Dataset.from_dict({"messages": [[{"role": "system", "content": None}, *turns],
                                         [{"role": "system", "content": ""}, *turns]]})
    with pytest.raises(ValueError, match=r"1 of 2 rows cannot be trained on: row 0: the system message has no text"):
        check_sft_dataset(ds)


def test_card_names_the_chat_template_that_trained(tmp_path, sample):
    """With another `chat_template_path` the card still said it trained with FastChat's Vicuna v1.1
    template (heading, text and `vicuna` tag), beside the other template it showed."""
    model, tok = tiny_llama()
    template = tmp_path / "my_chatml.jinja"
    template.write_text("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
                        "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{%- else -%}"
                        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{%- endif -%}{%- endfor -%}"
                        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
    args = vicuna_sft_config(tmp_path / "out", max_length=256, chat_template_path=str(template), max_steps=1,
                             per_device_train_batch_size=1, gradient_accumulation_steps=1,
                             activation_checkpointing=False, use_cpu=True, report_to="none")
    trainer = vicuna_sft_trainer(model, sample.select(range(2)), args, processing_class=tok)
    card = str(trainer.model_card())
    assert "## Chat template (my_chatml.jinja (local file))" in card and "Vicuna v1.1 conversation" not in card
    assert "- vicuna\n" not in card.split("---")[1] and str(tmp_path) not in card
    vicuna = str(vicuna_sft_trainer(tiny_llama()[0], sample.select(range(2)), vicuna_sft_config(
        tmp_path / "v", max_length=256, max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        activation_checkpointing=False, use_cpu=True, report_to="none"), processing_class=tok).model_card())
    assert "## Chat template (vicuna_v1.1)" in vicuna and "FastChat's Vicuna v1.1 conversation" in vicuna
    assert "- vicuna\n" in vicuna.split("---")[1]


def test_eval_rows_trl_drops_or_cuts_are_counted_too(tmp_path, caplog):
    """TRL drops eval rows whose prompt fills max_length as it does train rows: only the train
    ones were said, so the eval loss silently covered fewer rows."""
    from datasets import Dataset

    model, tok = tiny_llama()
    ds = Dataset.from_dict({"instruction": ["Say hi.", "word " * 200], "output": ["Hi!", "ok"]})
    args = vicuna_sft_config(tmp_path / "out", max_length=128, max_steps=1, per_device_train_batch_size=1,
                             gradient_accumulation_steps=1, activation_checkpointing=False, use_cpu=True,
                             report_to="none", eval_strategy="steps", eval_steps=1)
    with caplog.at_level("WARNING", logger="reflectune_hf.training.sft"):
        vicuna_sft_trainer(model, ds.select([0]), args, eval_dataset=ds, processing_class=tok)
    assert "1 of 2 eval rows were dropped by TRL" in caplog.text
