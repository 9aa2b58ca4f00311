"""LLMGoals: the real openai client against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/chat_server.py)."""

from __future__ import annotations

import logging
import pickle
import socket
import time

import pytest

from chat_server import ChatServer, chat_server  # noqa: F401  (the fixture; tests/ is on sys.path)
from toolkit.errors import ToolkitError
from toolkit.exploration.llm_goals import LLMGoals, parse_goals

CAPTION = "You see tree, grass and water. You have nothing in your inventory."


def goals_at(server: ChatServer, **kwargs) -> LLMGoals:
    return LLMGoals(**{"base_url": server.url, "model": "test-model", "timeout_s": 5.0, "max_retries": 0, **kwargs})


def test_goals_parsed_from_bullets_numbers_and_commas(chat_server):
    g = goals_at(chat_server)
    chat_server.reply = "Here are the best next goals:\n- Collect wood.\n- Place Table\n* drink water\n- collect wood"
    assert g.suggest(CAPTION, {}) == ["collect wood", "place table", "drink water"]
    chat_server.reply = "1. **Collect sapling**: grass is nearby\n2) Place plant (for food later)\n3. eat cow\nGood luck!"
    assert g.suggest("caption 2", {}) == ["collect sapling", "place plant", "eat cow"]
    chat_server.reply = "collect wood, place_table; make wood pickaxe"
    assert g.suggest("caption 3", {}) == ["collect wood", "place table", "make wood pickaxe"]
    chat_server.reply = "\n".join(f"- goal {i}" for i in range(9))
    assert g.suggest("caption 4", {}) == [f"goal {i}" for i in range(5)]  # max_goals
    assert g.stats() == {"calls": 4.0, "cache_hits": 0.0, "unparsable": 0.0, "failures": 0.0}

    body = chat_server.requests[0]["body"]  # what the model was asked
    assert body["model"] == "test-model" and body["temperature"] == 0.0
    system, user = body["messages"]
    assert system["role"] == "system" and "Crafter" in system["content"]
    assert user["role"] == "user" and user["content"].startswith(CAPTION)
    assert "What are the best next goals?" in user["content"] and "- collect wood" in user["content"]


def test_vocabulary_keeps_and_matches_goals(chat_server):
    g = goals_at(chat_server, goals=["collect wood", "place table", "eat cow"])
    chat_server.reply = "- Collect wood\n- Place a table\n- Fly to the moon\n- eat the cow"
    assert g.suggest(CAPTION, {}) == ["collect wood", "place table", "eat cow"]
    user = chat_server.requests[0]["body"]["messages"][1]["content"]
    assert "Possible goals: collect wood, place table, eat cow." in user
    chat_server.reply = "- fly to the moon"
    assert g.suggest("another caption", {}) == [] and g.unparsable == 1  # nothing in the vocabulary


def test_same_caption_costs_one_request(chat_server):
    g = goals_at(chat_server)
    first = g.suggest(CAPTION, {})
    first.append("mutated by the caller")  # a returned list is the caller's: the cache keeps its own
    assert g.suggest(CAPTION, {"inventory": {}}) == ["collect wood"]
    assert chat_server.count() == 1 and g.calls == 1 and g.cache_hits == 1
    copy = pickle.loads(pickle.dumps(g))  # e.g. into an env worker: the cache travels, the connection pool does not
    assert copy.suggest(CAPTION, {}) == ["collect wood"] and copy.suggest("new caption", {}) == ["collect wood"]
    assert chat_server.count() == 2


def test_unparsable_reply_gives_no_goals_and_is_counted(chat_server, caplog):
    g = goals_at(chat_server)
    chat_server.reply = "I'm sorry, but I can't help with that request."
    with caplog.at_level(logging.WARNING, logger="toolkit.exploration.llm_goals"):
        assert g.suggest(CAPTION, {}) == []
    assert g.unparsable == 1 and g.failures == 0 and "no goals" in caplog.text
    assert g.suggest(CAPTION, {}) == [] and chat_server.count() == 1  # at temperature 0 asking again would repeat it
    for reply in ["", "What do you want?", "Sorry. I can't."]:
        assert parse_goals(reply) == []


def test_timeout_gives_no_goals_counts_and_is_not_cached(chat_server):
    g = goals_at(chat_server, timeout_s=0.3)
    chat_server.delay_s = 1.0
    start = time.monotonic()
    assert g.suggest(CAPTION, {}) == []
    assert time.monotonic() - start < 0.9  # the client gave up at its timeout
    assert g.failures == 1 and g.unparsable == 0
    chat_server.delay_s = 0.0  # the server recovers: the same caption is asked again, and answered
    assert g.suggest(CAPTION, {}) == ["collect wood"]
    assert g.stats() == {"calls": 2.0, "cache_hits": 0.0, "unparsable": 0.0, "failures": 1.0}


def test_server_error_is_retried_then_counted(chat_server):
    g = goals_at(chat_server, max_retries=1)
    chat_server.error_status = 503
    assert g.suggest(CAPTION, {}) == []
    assert chat_server.count() == 2 and g.failures == 1  # the first try and one retry


def test_refused_key_and_unknown_model_are_user_errors(chat_server):
    chat_server.error_status = 401
    with pytest.raises(ToolkitError, match="OPENAI_API_KEY"):
        goals_at(chat_server).suggest(CAPTION, {})
    with pytest.raises(ToolkitError, match="OPENAI_API_KEY"):
        goals_at(chat_server).check()
    chat_server.error_status = 404  # vLLM's answer for a model it does not serve
    with pytest.raises(ToolkitError, match="goals.model=test-model"):
        goals_at(chat_server).suggest(CAPTION, {})


def test_api_key_from_the_environment_variable(chat_server, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test-123")
    goals_at(chat_server, api_key_env="TEST_LLM_KEY").suggest(CAPTION, {})
    monkeypatch.delenv("TEST_LLM_KEY")
    goals_at(chat_server, api_key_env="TEST_LLM_KEY").suggest(CAPTION, {})
    auth = [r["headers"]["authorization"] for r in chat_server.requests]
    assert auth == ["Bearer sk-test-123", "Bearer EMPTY"]  # unset: vLLM's placeholder


def test_check_passes_against_a_server_and_warns_on_an_unlisted_model(chat_server, caplog):
    goals_at(chat_server).check()
    assert chat_server.count("/v1/models") == 1
    with caplog.at_level(logging.WARNING, logger="toolkit.exploration.llm_goals"):
        goals_at(chat_server, model="other-model").check()
    assert "goals.model=other-model" in caplog.text


def test_check_names_base_url_when_nothing_listens():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    start = time.monotonic()
    with pytest.raises(ToolkitError, match=f"goals.base_url={url}") as err:
        LLMGoals(base_url=url, model="m", max_retries=5).check()
    assert time.monotonic() - start < 2.0  # no retry chain
    assert "start the language-model server" in str(err.value)


def test_check_times_out_quickly_on_a_silent_server():
    with ChatServer(delay_s=5.0) as server:
        start = time.monotonic()
        with pytest.raises(ToolkitError, match="goals.base_url"):
            LLMGoals(base_url=server.url, model="m", timeout_s=30.0, max_retries=5, check_timeout_s=0.3).check()
        assert time.monotonic() - start < 2.0


def test_bad_config_is_a_user_error():
    with pytest.raises(ToolkitError, match="goals.base_url"):
        LLMGoals(base_url="", model="m")
    with pytest.raises(ToolkitError, match="goals.prompt"):
        LLMGoals(base_url="http://127.0.0.1:1/v1", model="m", prompt="{state}")
    with pytest.raises(ToolkitError, match="goals.goals is empty"):
        LLMGoals(base_url="http://127.0.0.1:1/v1", model="m", goals=[])
    with pytest.raises(ToolkitError, match="goals.max_goals"):
        LLMGoals(base_url="http://127.0.0.1:1/v1", model="m", max_goals=0)
