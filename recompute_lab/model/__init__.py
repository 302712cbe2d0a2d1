"""model/ — what is trained: the GPT and the seed's toy MLP (gpt.py), precision policies, training
data, and
Hugging Face causal LMs behind the same interface (hf/)."""
