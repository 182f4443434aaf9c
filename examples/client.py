"""Talk to a raylm endpoint with the official OpenAI client: a few questions to a chat model, answered
as they stream, and the similarity of sentences by their embeddings.

python examples/client.py [BASE_URL]      (default http://127.0.0.1:8000/v1)
"""

import math
import sys

from openai import OpenAI

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
]


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="not-needed")
    print("models:", ", ".join(model.id for model in client.models.list()))

    for question in QUESTIONS:
        print(f"\nQ: {question}\nA (smollm2, streamed): ", end="", flush=True)
        stream = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": question}],
            max_tokens=64,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()

    sentences = ["a cat sits on the mat", "a kitten rests on a rug", "the stock market fell sharply"]
    vectors = [item.embedding for item in client.embeddings.create(model="minilm", input=sentences).data]
    print(f"\nembeddings (minilm, {len(vectors[0])} dimensions): similarity to {sentences[0]!r}")
    for sentence, vector in zip(sentences[1:], vectors[1:]):
        print(f"  {cosine(vectors[0], vector):.3f}  {sentence!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1")
