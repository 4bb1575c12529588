"""LoRA training-step and adapter-inference time: laformer vs transformers + peft, in the same run.

Same SmolLM2-135M-shaped random model (fewer layers by default) in both, same LoRA (r=8, q/v), same batch.
Prints median milliseconds per step and the ratio peft/laformer (> 1 means laformer is faster).

    python bench/bench_peft.py [--layers 6] [--batch 4] [--seq 128] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def timed_pair(fn_a, fn_b, steps: int) -> tuple[float, float]:
    """Median ms of each, run alternately so that load from other processes hits both alike."""
    fn_a(), fn_b()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, bucket in ((fn_a, times[0]), (fn_b, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def train_step(model, ids, optimizer, call):
    def step():
        loss = call(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    import peft
    import transformers

    from laformer import LaFormerForCausalLM
    from laformer.peft import LoraConfig, get_peft_model, trainable_summary

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, tie_word_embeddings=True,
        max_position_embeddings=2048)
    folder = tempfile.mkdtemp()
    transformers.LlamaForCausalLM(hf_config).save_pretrained(folder)
    ids = torch.randint(0, 49152, (args.batch, args.seq))

    ours = get_peft_model(LaFormerForCausalLM.from_pretrained(folder), LoraConfig(r=8, lora_alpha=16)).train()
    theirs = peft.get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")).train()
    print(trainable_summary(ours))

    rows = []
    for name, fn_ours, fn_theirs in [
        ("train step (fwd+bwd+AdamW)",
         train_step(ours, ids, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], 1e-4),
                    lambda m, x: m(x, labels=x).loss),
         train_step(theirs, ids, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], 1e-4),
                    lambda m, x: m(input_ids=x, labels=x).loss)),
        ("forward, adapter unmerged",
         lambda: ours(ids), lambda: theirs(input_ids=ids)),
    ]:
        with torch.set_grad_enabled(name.startswith("train")):
            a, b = timed_pair(fn_ours, fn_theirs, args.steps)
        rows.append((name, a, b))
    print(f"\nbatch {args.batch} x {args.seq} tokens, {args.layers} layers, {torch.get_num_threads()} threads")
    print(f"{'case':<30}{'laformer ms':>14}{'peft ms':>12}{'peft/laformer':>15}")
    for name, a, b in rows:
        print(f"{name:<30}{a:>14.1f}{b:>12.1f}{b / a:>15.2f}")


if __name__ == "__main__":
    main()
