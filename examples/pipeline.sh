#!/usr/bin/env bash
# biogpt in a shell pipeline: continue titles to JSONL, count tokens, find the least surprising lines.
#   examples/pipeline.sh TITLES.txt          (model: $BIOGPT_MODEL, default microsoft/biogpt)
set -euo pipefail
titles=${1:?usage: pipeline.sh TITLES.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. Continue the first three titles; one JSON record per line, written as each one finishes.
head -n 3 "$titles" | biogpt generate --max-new-tokens 20 --format jsonl > "$work/continued.jsonl"
echo "continued $(wc -l < "$work/continued.jsonl") titles"

# 2. Token counts per line (Moses + BPE, the same ids as the reference tokenizer).
biogpt tokenize --no-special "$titles" | awk '{ total += NF } END { print "tokens:", total }'

# 3. Perplexity per line (tokens, mean NLL, perplexity), lowest first.
biogpt score "$titles" | paste - "$titles" | sort -t "$(printf '\t')" -k3,3g | head -n 2 | cut -f 3-
