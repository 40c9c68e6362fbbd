"""export_gguf in-process, GGUF files read back, and a model folder beside its GGUF export in
llama.cpp (Pair): shared by the GGUF test files. Needs the `gguf` package (test modules skip first)."""
import json
import types

import gguf
import numpy as np
import pytest

from conftest import REPO, import_script

EXPORT = REPO / "export_gguf.py"
exporter = import_script(EXPORT, "export_gguf")


def run_main(capsys, *args):
    """export_gguf's command line in-process, through run_cli as the script runs it: (exit status,
    stdout, stderr) as a process would give."""
    from mvlm_engine.cli import run_cli

    with pytest.raises(SystemExit) as stop:
        run_cli(exporter.PROG, exporter.main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=stop.value.code or 0, stdout=out, stderr=err)


def export(capsys, model_dir, output, *extra):
    return run_main(capsys, "--model_dir", model_dir, "--output", output, *extra)


def export_ok(model_dir, output, dtype="f32"):
    """In-process export (no interpreter start-up per test); raises on any problem."""
    exporter.export(model_dir, output, dtype)
    return output


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def field(reader, key):
    return reader.get_field(key).contents()


# --------------------------------------------------------------------------- llama.cpp beside transformers


PROMPT = "In the beginning God created"


def held_out_text(corpus_dir, n_chars=6000):
    """A fixed stretch of the corpus's held-out books (never trained on)."""
    from mvlm_engine.corpus import load_corpus
    return "\n".join(load_corpus(corpus_dir).documents("val"))[:n_chars]


class Pair:
    """One model folder as transformers loads it, and its GGUF export in llama.cpp."""

    def __init__(self, model_dir, gguf_path, llama_cpp):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        remote = json.loads((model_dir / "config.json").read_text())["model_type"] == "simone"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=remote,
                                                          dtype=torch.float32).eval()
        reader = gguf.GGUFReader(str(gguf_path))
        self.n_ctx = field(reader, f"{field(reader, 'general.architecture')}.context_length")
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=self.n_ctx, n_batch=self.n_ctx,
                                   logits_all=True, n_threads=2, seed=0, verbose=False)

    def hf_ids(self, text):
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def cpp_ids(self, text, special=False):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def hf_greedy(self, ids, n):
        import torch
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                                      pad_token_id=self.tokenizer.eos_token_id)  # plain greedy, as llama.cpp's
        return out[0, len(ids):].tolist()

    def cpp_greedy(self, ids, n):
        """Argmax decoding with llama.cpp's KV cache, one token at a time."""
        self.llm.reset()
        self.llm.eval(ids)
        new = []
        for _ in range(n):
            new.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([new[-1]])
        return new

    def hf_logprobs(self, ids):
        import torch
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()

    def cpp_logprobs(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)
        peak = logits.max(-1, keepdims=True)
        log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(-1))
        return (logits[np.arange(len(ids) - 1), ids[1:]] - log_norm[:-1])


def perplexities(pair, text):
    """Held-out perplexity of both runtimes on the same ids, in windows of the model's context."""
    ids = pair.hf_ids(text)
    windows = [ids[i: i + pair.n_ctx] for i in range(0, len(ids) - pair.n_ctx + 1, pair.n_ctx)][:8]
    assert len(windows) >= 2, len(ids)
    hf = np.concatenate([pair.hf_logprobs(w) for w in windows])
    cpp = np.concatenate([pair.cpp_logprobs(w) for w in windows])
    return float(np.exp(-hf.mean())), float(np.exp(-cpp.mean())), len(hf)
