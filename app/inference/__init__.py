"""Inference: sample responses from a causal LM, and build the model folders it loads.

Both the web process (serving, the playground) and the trainers (PPO rollouts, the evaluation gate)
import it, so from the rest of the project it may import only `app.common`. Code outside the package
imports only its public modules:

- `app.inference.sampling`: `SamplingConfig` and the next-token sampling functions;
- `app.inference.generator`: `BatchedGenerator` (batched and streamed generation) and its `Rollout`;
- `app.inference.model_files`: the base policy from the shipped GGUF or a local folder, the tiny test model.

`decoders` and `projections` are the generator's forward engine (the fast Llama path and its LoRA
handling) and may change shape freely.
"""
