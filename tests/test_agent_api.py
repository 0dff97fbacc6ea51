"""The agent API with the clients agent builders use, unchanged, against a served app.

One local Ray serves the demo's SmolLM2-135M-Instruct (a real chat model, on
CPU) as `summarizer`. The openai SDK covers each request field, structured
output and tools, streamed and not; LangChain's `with_structured_output` and
`bind_tools`, the OpenAI Agents SDK's default (Responses API) model,
pydantic-ai's chat and Responses models and smolagents' ToolCallingAgent run
as their users write them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from ray import serve
from serve_support import model_config
from shared_cluster import shared_serve

from deployments.app import AppArgs, build_app

pytestmark = [pytest.mark.slow, pytest.mark.shared_serve]
ROLE = "summarizer"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
VERDICT = {
    "type": "object",
    # A bounded integer: unbounded, a sampled answer can be all digits until max_tokens cuts it.
    "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("agent-api")
    config = model_config(
        directory / "model_configs.yaml",
        {ROLE: {"model": "demo:smollm2-135m-instruct", "context_length": 2048, "max_batch_size": 4}},
    )
    with shared_serve() as port:
        serve.run(build_app(AppArgs(model_config=str(config), gpus="none")), name="agents", route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


# ------------------------------------------------------------ openai SDK


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT, "strict": True}}
    messages = [{"role": "user", "content": "Is the sky blue? Answer as JSON."}]
    # Greedy: the content is compared below.
    answer = client.chat.completions.create(
        model=ROLE, messages=messages, response_format=response_format, temperature=0, max_tokens=64
    )
    assert answer.choices[0].finish_reason == "stop"  # the grammar closed the object, max_tokens did not cut it
    verdict = json.loads(answer.choices[0].message.content)
    jsonschema.validate(verdict, VERDICT)  # exactly the two fields, the enum and the integer's bounds
    assert 0 < answer.usage.completion_tokens < 64
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # Streamed, greedy: the same object token for token, with the same usage.
    chunks = list(
        client.chat.completions.create(
            model=ROLE,
            messages=messages,
            response_format=response_format,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
            max_tokens=64,
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    # Sampled: only what sampling cannot break (the grammar: every field, the enum, the bounds; compact JSON
    # with a bounded integer ends well within max_tokens).
    sampled = client.chat.completions.create(
        model=ROLE, messages=messages, response_format=response_format, temperature=0.7, max_tokens=64
    )
    assert sampled.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(sampled.choices[0].message.content), VERDICT)


def test_json_object_response_format_on_completions(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=ROLE,
        prompt="A JSON object about a cat:",
        max_tokens=48,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].text), dict)
    else:  # cut at max_tokens: still a JSON prefix (never prose)
        assert answer.choices[0].text.lstrip().startswith("{")


def test_required_tool_call_streamed_and_not(client: openai.OpenAI) -> None:
    # Greedy, as in the round trip below: sampled at 1.0, this 135M model can spend max_tokens inside
    # the arguments' string, and a call cut there is no call (finish_reason "length", the raw text).
    # Parallel calls allowed (the default): how many the model makes is its choice (greedy, one CPU gave
    # one call and another two), so every call is checked, not a count.
    answer = client.chat.completions.create(
        model=ROLE, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=64, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls, "tool_choice 'required' answered without a call"
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id and call.function.name == "get_weather"
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
        assert set(arguments) == {"city"} and arguments["city"].strip()
    assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)
    assert 0 < answer.usage.completion_tokens <= 64

    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        client.chat.completions.create(
            model=ROLE,
            messages=QUESTION,
            tools=[WEATHER_TOOL],
            tool_choice=named,
            parallel_tool_calls=False,  # one call, by the grammar: the count below is the API's promise
            max_tokens=64,
            stream=True,
            temperature=0,
        )
    )
    deltas = [c.choices[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].finish_reason == "tool_calls"
    (streamed_call,) = deltas[0].delta.tool_calls
    assert streamed_call.index == 0 and streamed_call.id and streamed_call.function.name == "get_weather"
    streamed_arguments = json.loads(streamed_call.function.arguments)
    jsonschema.validate(streamed_arguments, WEATHER_TOOL["function"]["parameters"])
    assert set(streamed_arguments) == {"city"} and streamed_arguments["city"].strip()


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    # Greedy: sampled at 1.0 (no temperature), one full-suite run got an answer with no readable tool
    # call from this 135M model within max_tokens; the round trip is what this test is about.
    first = client.chat.completions.create(
        model=ROLE,
        messages=QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,  # one call, so one tool result answers it
        max_tokens=64,
        temperature=0,
    )
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    history = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    final = client.chat.completions.create(
        model=ROLE, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=24, temperature=0
    )
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length") and 0 < final.usage.completion_tokens <= 24
    # The call and its result went into the prompt: longer than the question alone, asked the same way.
    alone = client.chat.completions.create(
        model=ROLE, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=1, temperature=0
    )
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens


def test_the_fields_clients_send(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=ROLE,
        messages=QUESTION,
        max_tokens=12,
        n=2,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"17": 5},
        store=False,
        metadata={"run": "test"},
        parallel_tool_calls=False,
        user="someone",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 12, "ignore_eos": True},
    )
    assert [c.index for c in answer.choices] == [0, 1]
    # Sampled, but min_tokens = max_tokens and EOS ignored: 12 tokens each, cut by the length, whatever is drawn.
    assert [c.finish_reason for c in answer.choices] == ["length", "length"]
    assert all(c.message.content for c in answer.choices)
    assert answer.usage.completion_tokens == 24
    chunks = list(
        client.chat.completions.create(
            model=ROLE,
            messages=QUESTION,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": False, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_bad_agent_requests_are_400s_in_openai_shape(base_url: str) -> None:
    bodies = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "unknown_tool"}}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
        {"logprobs": True, "top_logprobs": 21},
    ]
    for extra in bodies:
        reply = httpx.post(
            f"{base_url}/chat/completions", json={"model": ROLE, "messages": QUESTION, **extra}, timeout=30
        )
        assert reply.status_code == 400, (extra, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]


# ------------------------------------------------------------ Responses API


def test_responses_text_and_function_call(client: openai.OpenAI) -> None:
    text = client.responses.create(
        model=ROLE, input="Say hello.", instructions="Be brief.", max_output_tokens=16, temperature=0
    )
    assert text.output_text and 0 < text.usage.output_tokens <= 16
    assert text.usage.total_tokens == text.usage.input_tokens + text.usage.output_tokens
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    # Greedy, as every required tool call here: sampled, the 135M model can spend max_output_tokens in the string.
    called = client.responses.create(
        model=ROLE,
        input=QUESTION[0]["content"],
        tools=[tool],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls, called.output  # parallel calls are allowed: each one must be a whole, valid call
    for call in calls:
        arguments = json.loads(call.arguments)
        assert call.name == "get_weather" and call.call_id and set(arguments) == {"city"} and arguments["city"].strip()
    events = list(
        client.responses.create(model=ROLE, input="Say hello.", max_output_tokens=8, stream=True, temperature=0)
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed and streamed == events[-1].response.output_text
    assert 0 < events[-1].response.usage.output_tokens <= 8


def test_responses_refuses_server_side_state(base_url: str) -> None:
    reply = httpx.post(
        f"{base_url}/responses", json={"model": ROLE, "input": "hi", "previous_response_id": "resp_1"}, timeout=30
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "previous_response_id"


# ------------------------------------------------------------ LangChain, OpenAI Agents SDK


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int


def test_langchain_structured_output_and_tools(base_url: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    # Greedy, as extraction code usually runs; a 135M model sampled at 1.0 can ramble inside a string.
    chat = ChatOpenAI(model=ROLE, base_url=base_url, api_key="unused", max_tokens=64, max_retries=0, temperature=0)
    question = "Is the sky blue? Reply as JSON with keys answer (yes or no) and confidence (an integer)."
    structured = chat.with_structured_output(Verdict, method="json_schema", include_raw=True).invoke(question)
    assert structured["parsing_error"] is None
    # The model's own JSON has exactly Verdict's fields, and it is what LangChain parsed.
    raw = json.loads(structured["raw"].content)
    assert set(raw) == {"answer", "confidence"} and raw["answer"] in ("yes", "no")
    assert structured["parsed"] == Verdict(**raw)
    # json_mode sends no schema (only "some JSON object"): what is guaranteed is a JSON object;
    # whether its keys match is up to the model.
    loose = chat.with_structured_output(Verdict, method="json_mode", include_raw=True).invoke(question)["raw"]
    assert isinstance(json.loads(loose.content), dict)

    @tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return f"18 C in {city}"

    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert message.tool_calls  # parallel calls are allowed: each one must be a whole, valid call
    for call in message.tool_calls:
        assert call["name"] == "get_weather" and call["id"]
        assert set(call["args"]) == {"city"} and call["args"]["city"].strip()


def test_openai_agents_sdk_one_tool_loop(base_url: str) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        calls.append(city)
        return f"18 C and sunny in {city}"

    model = OpenAIResponsesModel(model=ROLE, openai_client=openai.AsyncOpenAI(base_url=base_url, api_key="unused"))
    agent = Agent(
        name="weather",
        instructions="Answer weather questions with the get_weather tool.",
        tools=[get_weather],
        model=model,
        # Greedy, as the required-tool-call tests above: sampled at the default 1.0 the 135M model can
        # spend all 64 tokens inside the city string, and the SDK then raises on the cut response.
        model_settings=ModelSettings(tool_choice="required", max_tokens=64, temperature=0),
        # The demo's 135M model keeps calling tools when left to choose, so the loop ends at the
        # tool's result: the SDK's request, the call it parses and the tool run are what is tested.
        tool_use_behavior="stop_on_first_tool",
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert len(calls) == 1 and calls[0].strip(), "the agent should call its tool once, with a city"
    assert result.final_output == f"18 C and sunny in {calls[0]}"


def _tool_calls(run: Any) -> list[Any]:
    """The tool calls the model made in a pydantic-ai run."""
    from pydantic_ai.messages import ModelResponse, ToolCallPart

    return [
        part
        for message in run.all_messages()
        if isinstance(message, ModelResponse)
        for part in message.parts
        if isinstance(part, ToolCallPart)
    ]


@pytest.mark.parametrize("model_class", ["OpenAIChatModel", "OpenAIResponsesModel"])
def test_pydantic_ai_structured_output_and_an_output_tool(base_url: str, model_class: str) -> None:
    from pydantic_ai import Agent, ToolOutput
    from pydantic_ai.models import openai as pydantic_ai_openai
    from pydantic_ai.providers.openai import OpenAIProvider

    model = getattr(pydantic_ai_openai, model_class)(ROLE, provider=OpenAIProvider(base_url=base_url, api_key="unused"))
    settings = {"temperature": 0, "max_tokens": 64}
    # pydantic-ai's default structured output: a `final_result` tool the model must call (tool_choice required).
    run = Agent(model, output_type=Verdict, model_settings=settings).run_sync("Is water wet?")
    # The model called the output tool with exactly Verdict's fields, and its first call is the output.
    finals = [part for part in _tool_calls(run) if part.tool_name == "final_result"]
    assert finals and all(set(final.args_as_dict()) == {"answer", "confidence"} for final in finals)
    assert run.output == Verdict(**finals[0].args_as_dict())
    assert run.usage.requests == 1 and run.usage.output_tokens > 0

    cities: list[str] = []

    def get_weather(city: str) -> str:
        """Current weather for a city."""
        cities.append(city)
        return f"18 C and sunny in {city}"

    # A function as the agent's output tool: the loop ends with the tool's result.
    agent = Agent(model, output_type=ToolOutput(get_weather), model_settings=settings)
    result = agent.run_sync("What is the weather in Paris?")
    assert len(cities) == 1 and cities[0].strip() and result.output == f"18 C and sunny in {cities[0]}"
    # pydantic-ai names an output tool `final_result`, whatever function it runs, and runs the first call
    # of a response (the model may send several): that one's argument is the city the function got.
    calls = [part for part in _tool_calls(result) if part.tool_name == "final_result"]
    assert calls and calls[0].args_as_dict() == {"city": cities[0]}
    assert all(set(call.args_as_dict()) == {"city"} for call in calls)


def test_smolagents_tool_calling_agent(base_url: str) -> None:
    from smolagents import ActionStep, AgentMaxStepsError, OpenAIServerModel, ToolCallingAgent, tool

    cities: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Current weather for a city.

        Args:
            city: the city's name
        """
        cities.append(city)
        return f"18 C and sunny in {city}"

    model = OpenAIServerModel(model_id=ROLE, api_base=base_url, api_key="unused", temperature=0, max_tokens=64)
    # Every step is a parsed, valid tool call (smolagents asks with tool_choice required) that the agent
    # runs. The demo's 135M model keeps asking for the weather (and repeats a final_answer call, which
    # smolagents refuses), so the run is cut after one step rather than waiting for a final answer: at
    # the cut smolagents asks for an answer from the run so far (the step's call and the tool's result
    # as history). Each step sends smolagents' ~1,100-token prompt: a second one costs ~20 s on 2 cores.
    agent = ToolCallingAgent(tools=[get_weather], model=model, max_steps=1, verbosity_level=0)
    answer = agent.run("What is the weather in Paris?")
    steps = [step for step in agent.memory.steps if isinstance(step, ActionStep) and step.tool_calls]
    assert cities and all(city.strip() for city in cities)
    assert steps and all(step.error is None for step in steps)
    # The request with the call and its result in its history was answered: smolagents turns a failed
    # one into this text instead of raising.
    assert isinstance(agent.memory.steps[-1].error, AgentMaxStepsError)
    assert isinstance(answer, str) and answer.strip(), answer
    assert not answer.startswith("Error in generating final LLM output"), answer
    # Each step's call was parsed into the tool's name and its one argument.
    calls = [call for step in steps for call in step.tool_calls]
    arguments = calls[0].arguments
    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert calls[0].name == "get_weather" and arguments == {"city": cities[0]}
