"""The fused model's model card: what it was trained from, and how."""

from __future__ import annotations

import yaml

from mergekit_evolver.fusion.vocab import VocabMap


def model_card(config, inputs, maps: dict[str, VocabMap], stats: dict[str, dict[str, float]], history: list, examples: int) -> str:
    method = {"min_ce": "MinCE (per sequence, the source with the lowest cross-entropy)",
              "avg_ce": "AvgCE (sources weighted by softmax of exp(-CE))"}[config.fusion]
    weight_label = "chosen for" if config.fusion == "min_ce" else "mean weight"
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- knowledge-fusion",
        "- fusellm",
        "- mergekit-evolver",
        "---",
        "",
        "# Knowledge fusion of causal LMs (FuseLLM)",
        "",
        f"`{inputs.target.path}` ({inputs.target.architecture}) continually trained on the next-token "
        f"distributions of {len(inputs.sources)} source model(s) of other architectures and tokenizers, "
        "following FuseLLM (Wan et al., *Knowledge Fusion of Large Language Models*, ICLR 2024). "
        "Made with `mergekit-evolver fuse`.",
        "",
        "## Recipe",
        "",
        f"- Corpus: {config.corpus.describe()}, {examples} texts, at most {config.seq_len} target tokens each.",
        f"- Each source's top-{config.top_k} tokens per position, mapped onto the target vocabulary "
        "(special tokens by role, exact text after undoing each tokenizer's space and byte markers, "
        "else the nearest token by edit distance) and aligned to the target's tokens by dynamic "
        "programming on edit distance; a target position with no 1:1 aligned source token gets a "
        "one-hot of its own token.",
        f"- Fusion: {method}, temperature {config.temperature}.",
        f"- Loss: {config.lambda_} x causal LM + {1 - config.lambda_:g} x cross-entropy to the fused distribution.",
        f"- Training: {config.steps} steps of AdamW, batch {config.batch_size}, learning rate "
        f"{config.learning_rate} ({config.warmup_steps} warmup steps, cosine decay), seed {config.seed}, {config.dtype}.",
        "",
        "## Sources",
        "",
        f"| source | architecture | vocabulary | mapped exactly / nearest / special | mean CE on the corpus | target predictions distilled | {weight_label} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for src in inputs.sources:
        c = maps[src.name].counts()
        s = stats[src.name]
        weight = f"{s['weight']:.0%} of texts" if config.fusion == "min_ce" else f"{s['weight']:.3f}"
        lines.append(
            f"| {src.name} (`{src.path}`) | {src.architecture} | {len(src.tokenizer)} | "
            f"{c['exact']} / {c['nearest']} / {c['special']} | {s['mean_ce']:.4f} | {s['distilled']:.1%} | {weight} |"
        )
    if history:
        first, last = history[0], history[-1]
        lines += [
            "",
            "## Training",
            "",
            f"Loss (causal LM, fusion) at step 1: {first[0]:.4f} ({first[1]:.4f}, {first[2]:.4f}); "
            f"at step {len(history)}: {last[0]:.4f} ({last[1]:.4f}, {last[2]:.4f}).",
        ]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(config.dump(), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
