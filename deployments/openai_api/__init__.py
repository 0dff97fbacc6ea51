"""The OpenAI room: request and response models (`protocol`), the Responses API as a translation of
chat completions (`responses`) and log-probabilities in OpenAI's shapes (`logprobs`). It turns
OpenAI bodies into the engine's types (deployments.engine.generation) and back; it knows no Ray."""
