"""The user's own model_configs.yaml, unchanged, served on twins of the two MedGemma checkpoints.

The two hub ids resolve, offline, to tests/twins.py's miniatures laid out in a
Hugging Face cache: the same classes (Gemma3ForCausalLM; Gemma3ForConditionalGeneration
with a SigLIP tower and Gemma3Processor), layer pattern, 131072 positions, sliding
window, Gemma's token ids and chat template, pre-quantized bnb NF4. Real Ray with two
declared GPUs and their slots (the session's shared one, tests/shared_cluster.py, whose
replicas read that cache); the replicas load on CPU (RAYFIT_ALLOW_CPU_FALLBACK, the pin
itself still checked). Both roles answer chat, the 4B twin answers an image,
and /v1/placement shows each replica within its replica plan.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import constants
from PIL import Image
from ray import serve
from shared_cluster import SHARED_ENV, shared_serve

from deployments.app import AppArgs, build_app
from placement.config import load_model_configs

pytestmark = [pytest.mark.slow, pytest.mark.shared_serve]

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_CONFIG = REPO_ROOT / "model_configs.yaml"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def served(twin_hub_cache: Path) -> Iterator[str]:
    """The app of the user's file on 2 declared 24 GB GPUs; yields its base URL."""
    assert SHARED_ENV["HF_HUB_CACHE"] == str(twin_hub_cache)  # where the replicas look for the hub ids
    patch = pytest.MonkeyPatch()
    # The driver plans too: huggingface_hub read HF_HUB_CACHE when it was imported.
    patch.setattr(constants, "HF_HUB_CACHE", str(twin_hub_cache))
    try:
        with shared_serve() as port:
            args = AppArgs(model_config=str(USER_CONFIG), gpus="2x24GB")
            serve.run(build_app(args), name="rayfit", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
    finally:
        patch.undo()


def test_the_file_is_the_users_own() -> None:
    specs = load_model_configs(USER_CONFIG).models
    assert set(specs) == {"buffer_agent", "summarizer"}
    assert all(spec.model_fields_set <= {"provider", "model"} for spec in specs.values())


def test_both_roles_answer_chat_as_agents_send_it(served: str) -> None:
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    for role in ("buffer_agent", "summarizer"):
        messages = [
            {"role": "system", "content": "You summarise clinical notes."},
            {"role": "user", "content": "Patient stable, discharged home."},
        ]
        reply = client.chat.completions.create(model=role, messages=messages, **GREEDY)
        assert reply.choices[0].finish_reason == "length"  # the twins never pick <eos>: special rows are zero
        assert reply.usage is not None and reply.usage.completion_tokens == GREEDY["max_tokens"]
        assert reply.choices[0].message.content


def _png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (20, 160, 90)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_the_4b_twin_answers_an_image(served: str) -> None:
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    content = [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": _png_data_url()}},
    ]
    reply = client.chat.completions.create(
        model="summarizer", messages=[{"role": "user", "content": content}], **GREEDY
    )
    assert reply.usage is not None and reply.usage.completion_tokens == GREEDY["max_tokens"]
    # The prompt holds the image's soft tokens (4 per image on the twin) besides the text.
    text_only = client.chat.completions.create(
        model="summarizer", messages=[{"role": "user", "content": "Describe the image."}], **GREEDY
    )
    assert text_only.usage is not None and reply.usage.prompt_tokens > text_only.usage.prompt_tokens


def test_every_replica_stays_inside_its_plan(served: str) -> None:
    document = httpx.get(f"{served}/v1/placement", timeout=30).json()
    for role in ("buffer_agent", "summarizer"):
        plan, actual = document["models"][role]["plan"], document["models"][role]["replica"]["actual"]
        replica_plan = plan["replica_plan"]
        # Where the plan put it (the twins are tiny, so the size rules keep both on GPU 0; the real
        # checkpoints' plan, 27B on GPU 1, is tests/test_replica_plan.py's).
        assert actual["cuda_visible_devices"] == plan["cuda_visible_devices"] in ("0", "1")
        # The context is the plan's (the twins, like MedGemma, declare 131072 positions).
        assert replica_plan["context_length"] == 4096 and replica_plan["quantization"] == "nf4 (pre-quantized)"
        memory = actual["memory"]
        assert memory["kv_pool_bytes"] == replica_plan["kv_pool_bytes"]
        assert memory["kv_peak_bytes"] <= memory["kv_built_bytes"] <= plan["kv_cache_bytes"]
        # The planner sized the weights from the safetensors headers: within 2% of what was loaded.
        assert abs(memory["weights_bytes"] - replica_plan["weights_bytes"]) <= 0.02 * replica_plan["weights_bytes"]
