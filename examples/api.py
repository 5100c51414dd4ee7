"""biogpt-cli as a library: stream a continuation, run beam search, score candidate answers, find
the nearest title by embeddings, and run a transformers-style padded batch.

    python examples/api.py [MODEL]      (a folder or Hub id; default $BIOGPT_MODEL, else microsoft/biogpt)
"""

import os
import sys

from biogpt_cli import (
    BioGptError,
    BioGptForCausalLM,
    BioGptTokenizer,
    GenerationOptions,
    generate,
    stream_completions,
)
from biogpt_cli.scoring import choice_probabilities, embed

name = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("BIOGPT_MODEL", "microsoft/biogpt")
try:  # every error the library raises for a user to act on is a BioGptError, with a one-line message
    model = BioGptForCausalLM.from_pretrained(name)
    tokenizer = BioGptTokenizer.from_pretrained(name)
except BioGptError as e:
    sys.exit(f"error: {e}")
prompt = tokenizer.encode("COVID-19 is")

# Stream: text arrives as soon as later tokens can no longer change it.
print("COVID-19 is", end="", flush=True)
for event in stream_completions(model, tokenizer, [prompt], GenerationOptions(max_new_tokens=20)):
    print(event.text, end="", flush=True)
print()

# Beam search returns token ids; decode them yourself.
best = generate(model, [prompt], GenerationOptions(max_new_tokens=20, num_beams=5))[0][0]
print("beam:", tokenizer.decode(prompt + best.ids, skip_special_tokens=True))

# Which answer does the model find likeliest?
question = tokenizer.encode("Is aspirin an anti-inflammatory drug? Answer:")
answers = ["yes", "no", "maybe"]
probs = choice_probabilities(model, question, [tokenizer.encode(a, add_special_tokens=False) for a in answers])
print(", ".join(f"{a} {p:.2f}" for a, p in zip(answers, probs, strict=True)))

# Embeddings: the mean of each text's final hidden states, here of length 1, so a dot product is the cosine.
titles = ["Aspirin for the prevention of stroke", "Statins and the risk of stroke", "COVID-19 vaccine efficacy"]
vectors = embed(model, [tokenizer.encode(t) for t in titles], normalize=True)
print("nearest to the first title:", titles[1 + int((vectors[1:] @ vectors[0]).argmax())])

# A script written against transformers runs as it is: padded batches in, the reference's tensor out.
tokenizer.padding_side = "left"
batch = tokenizer(["COVID-19 is", "Aspirin"], padding=True, return_tensors="pt")
print(tokenizer.batch_decode(model.generate(**batch, max_new_tokens=10), skip_special_tokens=True))
