"""Train the repository's tiny Llama-architecture causal LM on the built-in corpus.

    python scripts/train_tiny_lm.py                     # writes allocator/assets/tiny-llama/

Steps (all seeded; same result for the same Python version, torch build and thread count):
1. a byte-level BPE tokenizer (``tokenizers``) on the corpus ``train`` split, saved as a
   ``PreTrainedTokenizerFast`` (``<s>`` prepended to every text, ``</s>`` between packed texts);
2. a ``LlamaForCausalLM`` (module names of the llama family: ``model.layers.N.self_attn.q_proj``,
   ``mlp.down_proj``, ``lm_head`` ...) trained with AdamW on packed ``seq_len`` windows of the
   ``train`` split, texts reshuffled every epoch;
3. perplexity of the saved (fp16-rounded) weights on the ``train`` and ``evaluation`` splits,
   next to a unigram baseline (train-split token frequencies, add-one smoothing), written to the
   model card README.md and to ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from allocator.model.data.corpus import corpus_fingerprint, corpus_texts  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "allocator" / "assets" / "tiny-llama"
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


def train_tokenizer(texts: list[str], vocab: int) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(sorted(texts), trainer)  # sorted: input order cannot matter
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> <s> $B", special_tokens=[("<s>", 1), ("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=1024)


def encode(tokenizer: transformers.PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each text: ``<s> text </s>``."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[1, *x, 2] for x in ids]


def windows(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate documents and cut into full ``seq_len`` windows (the tail is dropped)."""
    stream = [t for d in docs for t in d]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(data), batch):
        x = data[i:i + batch]
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def unigram_perplexity(train_docs: list[list[int]], evald: torch.Tensor, vocab: int) -> float:
    """exp(−mean log p(t)) of the eval targets under add-one-smoothed train-split frequencies."""
    stream = torch.tensor([t for d in train_docs for t in d], dtype=torch.long)
    counts = torch.bincount(stream, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(float(-logp[evald[:, 1:].reshape(-1)].mean()))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.2, help="attention dropout")
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--documents", type=Path, default=None,
                    help="JSON list of corpus documents (what `python -I -S "
                         "allocator/model/data/_stdlib_docs.py` prints) instead of this Python's")
    ap.add_argument("--save-dtype", choices=("float16", "float32"), default="float16")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    docs = None if args.documents is None else json.loads(args.documents.read_text())
    train_texts = corpus_texts("train", seed=args.seed, documents=docs)
    eval_texts = corpus_texts("evaluation", seed=args.seed, documents=docs)
    tokenizer = train_tokenizer(train_texts, args.vocab)
    vocab = len(tokenizer)
    train_docs = encode(tokenizer, train_texts)
    eval_data = windows(encode(tokenizer, eval_texts), args.seq_len)
    train_eval = windows(train_docs, args.seq_len)[:len(eval_data)]  # a same-size train sample
    n_train_tokens = sum(len(d) for d in train_docs)
    print(f"tokenizer: vocab {vocab}; train {n_train_tokens} tokens in {len(train_docs)} texts, "
          f"eval {eval_data.numel()} tokens ({time.perf_counter() - t0:.1f}s)")

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=max(256, args.seq_len),
        tie_word_embeddings=args.tie, attention_dropout=args.dropout, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    model = transformers.LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)
    rng = random.Random(args.seed)
    epoch, queue = 0, torch.empty(0, args.seq_len, dtype=torch.long)
    warmup = max(1, args.steps // 20)
    model.train()
    for step in range(args.steps):
        if len(queue) < args.batch_size:  # next epoch: reshuffle texts, re-pack
            order = list(range(len(train_docs)))
            rng.shuffle(order)
            queue = torch.cat([queue, windows([train_docs[i] for i in order], args.seq_len)])
            epoch += 1
        x, queue = queue[:args.batch_size], queue[args.batch_size:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, warmup)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} epoch {epoch} loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    train_seconds = time.perf_counter() - t0

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    model.eval()
    dtype = getattr(torch, args.save_dtype)
    model.to(dtype).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # measure what was saved: reload the (rounded) weights in float32
    saved = transformers.AutoModelForCausalLM.from_pretrained(
        args.out, dtype=torch.float32, local_files_only=True).eval()
    ppl_train = perplexity(saved, train_eval)
    ppl_eval = perplexity(saved, eval_data)
    ppl_unigram = unigram_perplexity(train_docs, eval_data, vocab)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    report = {
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "seed": args.seed, "threads": args.threads,
        "vocab": vocab, "hidden": args.hidden, "intermediate": args.intermediate,
        "layers": args.layers, "heads": args.heads, "tied": args.tie, "params": n_params,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
        "epochs": epoch, "lr": args.lr, "weight_decay": args.weight_decay,
        "attention_dropout": args.dropout, "save_dtype": args.save_dtype,
        "train_tokens": n_train_tokens, "eval_tokens": int(eval_data.numel()),
        "corpus_sha256": {s: corpus_fingerprint(s, documents=docs) for s in ("train", "evaluation")},
        "perplexity": {"train": round(ppl_train, 3), "evaluation": round(ppl_eval, 3),
                       "unigram_evaluation": round(ppl_unigram, 3)},
        "train_seconds": round(train_seconds, 1),
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    cmd = "python scripts/train_tiny_lm.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--out") and a != str(args.out))
    (args.out / "README.md").write_text(model_card(report, cmd.strip()))
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"params {n_params:,}; perplexity train {ppl_train:.2f}, evaluation {ppl_eval:.2f}, "
          f"unigram baseline {ppl_unigram:.2f}; {size / 1e6:.2f} MB in {args.out} "
          f"({train_seconds:.0f}s training)")
    return 0


def model_card(r: dict, cmd: str) -> str:
    p = r["perplexity"]
    arch = (f'`LlamaForCausalLM`, {r["layers"]} layers, hidden {r["hidden"]}, intermediate '
            f'{r["intermediate"]}, {r["heads"]} heads, {"tied" if r["tied"] else "untied"} '
            f'`lm_head`')
    training = (f'{r["steps"]} steps × {r["batch_size"]} × {r["seq_len"]} tokens ({r["epochs"]} '
                f'epochs over {r["train_tokens"]:,} tokens), AdamW lr {r["lr"]}, weight decay '
                f'{r["weight_decay"]}, seed {r["seed"]}, {r["threads"]} CPU threads, '
                f'{r["train_seconds"]} s')
    return f"""# tiny-llama (bitalloc test/demo model)

A {r["params"]:,}-parameter Llama-architecture causal LM trained from scratch by
`scripts/train_tiny_lm.py` on the `train` split of bitalloc's built-in corpus (docstrings of
Python standard-library modules, see `allocator/model/data/corpus.py`). It exists so the pipeline
(estimate → solve → apply → evaluate) has a real causal LM that ships with the package and runs
on a CPU in seconds. It is not a useful language model.

| | |
|---|---|
| architecture | {arch} |
| tokenizer | byte-level BPE, vocab {r["vocab"]} (`<pad>`=0, `<s>`=1, `</s>`=2; `<s>` prepended) |
| training | {training} |
| weights | `model.safetensors` in {r["save_dtype"]} |
| environment | Python {r["python"]}, torch {r["torch"]}, transformers {r["transformers"]} |

## Perplexity (measured on the saved weights, packed {r["seq_len"]}-token windows)

| split | perplexity |
|---|---|
| train | {p["train"]} |
| evaluation ({r["eval_tokens"]:,} tokens) | **{p["evaluation"]}** |
| unigram baseline on evaluation (train-split frequencies) | {p["unigram_evaluation"]} |

Corpus fingerprints (sha256 of the texts; docstrings differ slightly between Python versions):
train `{r["corpus_sha256"]["train"]}`, evaluation `{r["corpus_sha256"]["evaluation"]}`.

## Reproduce

```
{cmd}
```
`--documents FILE` trains on a corpus collected elsewhere (`python3.11 -I -S
allocator/model/data/_stdlib_docs.py > FILE`); on the Python that made it the default corpus is the same
(compare the fingerprints above). Bit-exact reproduction also needs the same torch build and
thread count.
"""


if __name__ == "__main__":
    raise SystemExit(main())
