"""The engine room: everything that runs next to the model, with no Ray Serve and no HTTP.

Importing this package is light (no torch): the Serve replica and the OpenAI layer import its
request types (`generation`), rules (`structured`, `tool_formats`, `images`) and errors without
loading a model. What loads torch is imported only where a model is served:

- `protocol`: the engine's face (generate, stream, cancel, reports), declared once; the in-process
  `core.Engine` and the process proxy `process.EngineProcess` both implement it;
- `core`: the in-process engine; `pool` (continuous batching) and `side` (`model.generate`) its
  backends, `kv` the sequence slots and KV ledger, `prompts`, `text`, `logprobs`, `row_logits`;
- `loading` (a model onto its planned device), `memory` (the plan's cap), `verify` (where the
  replica really runs), `contract` (what was built against the plan);
- `process`, `child`, `messages`, `host`, `orphan_guard`: the engine in a process of its own
  (`messages`: the fixed, typed set the replica and that process exchange);
- `generation`, `errors`: the types every room shares.
"""
