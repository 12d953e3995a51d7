"""A synthetic tool-use set, generated reproducibly, and the scoring of a model's tool calls.

Five tools with typed arguments (a city from a list, a unit enum, an amount, currency codes,
an integer of minutes, airport codes, ISO dates and times). Each conversation is a user request
in one of several phrasings; the assistant calls the right tool with exactly the arguments the
request states, the tool answers (a deterministic stand-in), and the assistant answers with the
result. One conversation in ten needs no tool: the right behaviour is to answer directly.

`parse_tool_calls` reads the calls out of a generated assistant turn in the format of the
ChatML or Llama-3 template (tests check it recovers every rendered call), and `score_calls`
says whether a generation is well formed, calls the right tool, and with the right arguments.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

from helox.chat.messages import Conversation, FunctionCall

CITIES = ["Paris", "Oslo", "Rome", "Madrid", "Berlin", "Lisbon", "Vienna", "Dublin", "Prague",
          "Athens", "Warsaw", "Helsinki"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF"]
AIRPORTS = ["CDG", "LHR", "FRA", "MAD", "FCO", "AMS", "OSL", "VIE"]
TASKS = ["tea", "laundry", "call mum", "oven", "stretch", "meeting"]
TITLES = ["dentist", "team sync", "yoga", "dinner with Ana", "project review"]


def _schema(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


TOOLS = [
    _schema("get_weather", "The current temperature in a city",
            {"city": {"type": "string", "enum": CITIES},
             "unit": {"type": "string", "enum": ["C", "F"]}}, ["city", "unit"]),
    _schema("convert_currency", "Convert an amount between currencies",
            {"amount": {"type": "number"}, "from": {"type": "string", "enum": CURRENCIES},
             "to": {"type": "string", "enum": CURRENCIES}}, ["amount", "from", "to"]),
    _schema("set_timer", "Start a timer",
            {"minutes": {"type": "integer", "minimum": 1, "maximum": 120},
             "label": {"type": "string"}}, ["minutes", "label"]),
    _schema("search_flights", "Flights between two airports on a date",
            {"origin": {"type": "string", "enum": AIRPORTS},
             "destination": {"type": "string", "enum": AIRPORTS},
             "date": {"type": "string", "format": "date"}}, ["origin", "destination", "date"]),
    _schema("add_event", "Add an event to the calendar",
            {"title": {"type": "string"}, "date": {"type": "string", "format": "date"},
             "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
            ["title", "date", "time"]),
]
SYSTEM = "You are a helpful assistant. Call a tool when it can answer the request."


# ---------------------------------------------------------------------------------------------
# Requests: (arguments, user phrasing, tool result, final answer) per tool


def _weather(rng: random.Random) -> tuple[str, dict, str, dict, Callable[[dict], str]]:
    city, unit = rng.choice(CITIES), rng.choice(["C", "F"])
    word = "Celsius" if unit == "C" else "Fahrenheit"
    ask = rng.choice([f"What's the weather in {city} in {word}?",
                      f"How warm is it in {city} right now? Give me {word}.",
                      f"Temperature in {city}, {word} please."])
    celsius = rng.randint(-5, 32)
    value = celsius if unit == "C" else round(celsius * 9 / 5 + 32)
    return "get_weather", {"city": city, "unit": unit}, ask, {"temperature": value}, \
        lambda r: f"It is {r['temperature']} °{unit} in {city}."


def _currency(rng: random.Random) -> tuple[str, dict, str, dict, Callable[[dict], str]]:
    source, target = rng.sample(CURRENCIES, 2)
    amount = rng.choice([5, 20, 50, 100, 250, 1000])
    ask = rng.choice([f"Convert {amount} {source} to {target}.",
                      f"How much is {amount} {source} in {target}?",
                      f"I have {amount} {source}; what is that in {target}?"])
    rate = round(rng.uniform(0.5, 1.5), 4)
    return "convert_currency", {"amount": amount, "from": source, "to": target}, ask, \
        {"result": round(amount * rate, 2)}, \
        lambda r: f"{amount} {source} is {r['result']} {target}."


def _timer(rng: random.Random) -> tuple[str, dict, str, dict, Callable[[dict], str]]:
    minutes, label = rng.randint(1, 90), rng.choice(TASKS)
    ask = rng.choice([f"Set a timer for {minutes} minutes for the {label}.",
                      f"Remind me about the {label} in {minutes} minutes.",
                      f"Timer: {minutes} min, label it {label}."])
    return "set_timer", {"minutes": minutes, "label": label}, ask, {"status": "started"}, \
        lambda r: f"Timer set: {label}, {minutes} minutes."


def _date(rng: random.Random) -> str:
    return f"2027-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _flights(rng: random.Random) -> tuple[str, dict, str, dict, Callable[[dict], str]]:
    origin, destination = rng.sample(AIRPORTS, 2)
    date = _date(rng)
    ask = rng.choice([f"Find flights from {origin} to {destination} on {date}.",
                      f"Any flights {origin} to {destination} on {date}?",
                      f"I need to fly {origin}-{destination} on {date}."])
    count = rng.randint(0, 6)
    return "search_flights", {"origin": origin, "destination": destination, "date": date}, \
        ask, {"flights": count}, \
        lambda r: f"I found {r['flights']} flights from {origin} to {destination} on {date}."


def _event(rng: random.Random) -> tuple[str, dict, str, dict, Callable[[dict], str]]:
    title, date = rng.choice(TITLES), _date(rng)
    time = f"{rng.randint(7, 20):02d}:{rng.choice(['00', '15', '30', '45'])}"
    ask = rng.choice([f"Add {title} to my calendar on {date} at {time}.",
                      f"Put '{title}' in the calendar for {date}, {time}.",
                      f"Schedule {title} on {date} at {time}."])
    return "add_event", {"title": title, "date": date, "time": time}, ask, {"status": "added"}, \
        lambda r: f"Added {title} on {date} at {time}."


REQUESTS = [_weather, _currency, _timer, _flights, _event]
SMALL_TALK = [("Hello!", "Hello! How can I help?"),
              ("Thanks, that's all.", "You're welcome!"),
              ("Who are you?", "I am an assistant that can use a few tools."),
              ("Tell me a fun fact.", "Octopuses have three hearts.")]


def tool_use_conversation(rng: random.Random) -> Conversation:
    """One conversation: a tool request (nine in ten) or small talk."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    if rng.random() < 0.1:
        ask, answer = rng.choice(SMALL_TALK)
        messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
        return Conversation.model_validate({"messages": messages, "tools": TOOLS})
    name, arguments, ask, result, answer = rng.choice(REQUESTS)(rng)
    messages += [
        {"role": "user", "content": ask},
        {"role": "assistant", "tool_calls": [{"id": "call_0", "type": "function", "function": {
            "name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(result)},
        {"role": "assistant", "content": answer(result)}]
    return Conversation.model_validate({"messages": messages, "tools": TOOLS})


def tool_use_set(count: int, seed: int, exclude: set[str] = frozenset()) -> list[Conversation]:
    """`count` conversations from `seed`, none whose user request is in `exclude`."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        conversation = tool_use_conversation(rng)
        if conversation.messages[1].content not in exclude:
            out.append(conversation)
    return out


def write_tool_use_set(folder: Path, train: int = 400, test: int = 100, seed: int = 0,
                       ) -> tuple[Path, Path]:
    """train.jsonl and test.jsonl in `folder`; no test request appears in train."""
    train_set = tool_use_set(train, seed)
    test_set = tool_use_set(test, seed + 1, {c.messages[1].content for c in train_set})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, conversations in (("train", train_set), ("test", test_set)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(c.model_dump_json(exclude_none=True) + "\n"
                                for c in conversations))
        paths.append(path)
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------------
# Reading and scoring generated calls

CHATML_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, template: str) -> list[FunctionCall] | None:
    """The calls in a generated assistant turn, in the template's format (chatml: JSON
    {"name", "arguments"} in <tool_call> tags; llama3: bare JSON {"name", "parameters"}); []
    when it calls nothing, None when it tries to and the call is malformed."""
    if template == "chatml":
        raw = CHATML_CALL.findall(text)
        if not raw:
            return None if "<tool_call>" in text else []
        key = "arguments"
    elif template == "llama3":
        raw = _json_objects(text) if text.lstrip().startswith("{") else []
        if text.lstrip().startswith("{") and not raw:
            return None
        key = "parameters"
    else:
        raise ValueError(f"no tool-call format for template {template!r}")
    calls = []
    for item in raw:
        try:
            parsed = json.loads(item) if isinstance(item, str) else item
            calls.append(FunctionCall(name=parsed["name"], arguments=json.dumps(parsed[key])))
        except (ValueError, KeyError, TypeError):
            return None
    return calls


def _json_objects(text: str) -> list[dict]:
    """Consecutive JSON objects at the start of `text`."""
    decoder, objects, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text) and text[at] == "{":
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return []
        objects.append(value)
        while at < len(text) and text[at].isspace():
            at += 1
    return objects


class CallScore(NamedTuple):
    well_formed: bool
    """Parsable calls (or, where none is expected, no attempt at one)."""
    right_tool: bool
    right_arguments: bool
    """The right tools with exactly the expected arguments (as JSON values)."""


def score_calls(generated: str, expected: list[FunctionCall], template: str) -> CallScore:
    calls = parse_tool_calls(generated, template)
    if calls is None:
        return CallScore(False, False, False)
    right_tool = [c.name for c in calls] == [c.name for c in expected]
    right_arguments = right_tool and all(
        c.parsed_arguments() == e.parsed_arguments() for c, e in zip(calls, expected))
    return CallScore(True, right_tool, right_arguments)
