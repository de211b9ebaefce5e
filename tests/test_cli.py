"""The `qwen2-jax` console script, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "qwen2-jax"


def run(*args):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0 and "demo" in out.stdout
    assert run("demo", "--help").returncode == 0


def test_demo_prints_one_json_line_within_tolerance(tmp_path):
    out = run("demo", "--tiny", "--out", str(tmp_path / "tiny"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["max_abs_logit_diff"] <= 1e-4
    assert report["generate_matches_transformers"] and report["generated_tokens"] > 0
    assert report["chat_prompt_tokens"] == 26  # the real tokenizer and Qwen2-Instruct template
    assert (tmp_path / "tiny" / "model.safetensors").exists()


def test_unknown_command_fails():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_demo_on_a_mesh_logs_what_it_replicates():
    out = run("demo", "--tiny", "--mesh", "fsdp=-1,tensor=4")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["mesh"] == {"data": 1, "fsdp": 2, "sequence": 1,
                                                "expert": 1, "tensor": 4}
    assert "heads of size 14 does not divide over tensor (4 devices); replicating it" in out.stderr


def test_bad_mesh_and_rules_are_clear_errors():
    out = run("demo", "--tiny", "--mesh", "tensor=3")
    assert out.returncode != 0 and "uses 3 devices but 8 are available" in out.stderr
    out = run("demo", "--tiny", "--mesh", "tensor=8", "--rules", "heads=model")
    assert out.returncode != 0 and "'heads' maps to unknown mesh axes ['model']" in out.stderr
    out = run("demo", "--tiny", "--coordinator", "127.0.0.1:1")
    assert out.returncode != 0 and "go together" in out.stderr


def test_generate_streams_the_text_of_greedy_generation(tmp_path, qwen2_tokenizer_dir):
    """A chat prompt through the real tokenizer: the streamed text is the decoded greedy
    tokens, which equal transformers' greedy generate on the same ids."""
    import torch

    from conftest import make_hf_model
    from qwen2_jax.tokenizer import Tokenizer

    model = make_hf_model(tmp_path, vocab_size=151936, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen2_tokenizer_dir / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": [151645, 151643], "max_new_tokens": 12}))
    out = run("generate", "--model", str(tmp_path), "--prompt", "Hi 你好", "--chat", "--system",
              "Be brief.")
    assert out.returncode == 0, out.stderr
    tokenizer = Tokenizer(str(tmp_path))
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好"}]))
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   eos_token_id=[151645, 151643], pad_token_id=151643)
    tokens = [t for t in reference[0, len(prompt):].tolist() if t not in (151645, 151643)]
    assert out.stdout == tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


def test_generate_prompts_file_prints_a_json_line_each(tmp_path, qwen2_tokenizer_dir):
    from conftest import make_hf_model

    make_hf_model(tmp_path, vocab_size=151936, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((qwen2_tokenizer_dir / name).read_bytes())
    (tmp_path / "prompts.txt").write_text("Hello\n\nWorld 世界\n")
    out = run("generate", "--model", str(tmp_path), "--prompts-file", str(tmp_path / "prompts.txt"),
              "--max-new-tokens", "5", "--temperature", "0.9", "--top-p", "0.9", "--seed", "3")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["Hello", "World 世界"]
    assert all(0 < x["tokens"] <= 5 for x in lines)
    bad = run("generate", "--model", str(tmp_path), "--prompt", "x", "--system", "s")
    assert bad.returncode != 0 and "--system needs --chat" in bad.stderr
