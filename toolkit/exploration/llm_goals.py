"""Goal suggestions from a language model behind any OpenAI-compatible chat-completions endpoint (ELLM's
suggester: Du et al. 2023, "Guiding Pretraining in Reinforcement Learning with Large Language Models").

ELLM prompts the model with a caption of the agent's observation and asks what the player should do next; each
suggested goal later earns an intrinsic reward when a transition achieves it (``toolkit.exploration.ellm``).
Their Crafter prompt is few-shot (two worked examples of a caption followed by ``- Chop tree``-style bullets, and
the list of valid verbs); ours is zero-shot: a system message that names the game, the caption, and an explicit
format instruction (one ``- goal`` per line), which instruction-tuned chat models follow without examples.

The same caption never costs a second request (``suggest`` caches by caption, as ELLM caches by prompt). A reply
that cannot be read as goals is counted in ``unparsable`` and answers ``[]``; a timeout or server error (after
the client's retries) is counted in ``failures``, answers ``[]`` and is not cached, so training never stops for
the language model and a later step asks again.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import openai

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

SYSTEM = ("You advise a player of Crafter, a 2-D Minecraft-like survival game: the player collects resources, "
          "crafts tools, places items, eats, drinks, sleeps and fights monsters.")
# {caption}: the state caption; {goal_list}: "Possible goals: ...\n" when a vocabulary is given, else ""
PROMPT = ("{caption}\n{goal_list}What are the best next goals? Answer with a list of short goals, one per line, "
          "like '- collect wood'.")
MAX_WORDS = 6  # a longer item is a sentence, not a goal
_MARKER = re.compile(r"^\s*(?:[-*•+]|\(?\d+[.)]|\d+\s*:)\s*")  # "- ", "* ", "• ", "1. ", "1) ", "(1) ", "1: "
_EXPLANATION = re.compile(r":|\s[-–—]\s|\(")  # "collect wood: trees are near" / "collect wood - ..." / "(...)"
_FILLERS = {"a", "an", "the", "some", "more"}  # dropped when matching a vocabulary


def _clean(item: str) -> str:
    """``"Collect  Wood."`` -> ``"collect wood"``; ``place_table`` -> ``place table``."""
    item = item.lower().replace("'", "").replace("’", "")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", item).split())


def parse_goals(reply: str) -> list[str]:
    """Goal strings of a reply: bullet or numbered lines (every other line is preamble and ignored), or, in a
    reply without them, lines that are comma-separated lists of short phrases. Lower-cased, punctuation
    stripped, deduplicated in order."""
    lines = [line.replace("**", "").replace("__", "").replace("`", "").strip() for line in reply.splitlines()]
    lines = [line for line in lines if line]
    marked = [_MARKER.sub("", line, count=1) for line in lines if _MARKER.match(line)]
    items: list[str] = []
    if marked:
        for line in marked:
            items += [_clean(p) for p in re.split(r"[,;]", _EXPLANATION.split(line, maxsplit=1)[0])]
    else:
        for line in lines:
            if line.endswith(":"):  # "Here are some goals:"
                continue
            parts = [p.strip() for p in re.split(r"[,;]", line) if p.strip()]
            # prose ("I'm sorry, but I can't ...") is not a list: a sentence inside, or a long part, rejects the line
            if any(re.search(r"[.!?]", p[:-1]) or p[-1] in "!?" or len(_clean(p).split()) > MAX_WORDS for p in parts):
                continue
            items += [_clean(p) for p in parts]
    return list(dict.fromkeys(i for i in items if i and len(i.split()) <= MAX_WORDS))


class LLMGoals:
    """Suggests goals for a state caption by asking a chat model at ``base_url`` (vLLM, Ollama, llama.cpp's
    server, OpenAI...). ``api_key_env``: the environment variable holding the key (unset: the placeholder
    ``EMPTY``, which local servers accept). ``timeout_s``/``max_retries``: per request, the client's own
    retries with backoff. ``goals``: an optional vocabulary: it is listed in the prompt, and a suggestion is
    kept only as the vocabulary goals it names (equal, or contained word for word once articles are dropped:
    "place a table" -> "place table"). ``max_goals``: the most goals one suggestion returns. ``prompt``: the
    user message, with ``{caption}`` and ``{goal_list}``; ``system``: the system message."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 10.0,
                 max_retries: int = 2, temperature: float = 0.0, max_goals: int = 5, goals: list[str] | None = None,
                 prompt: str = PROMPT, system: str = SYSTEM, max_tokens: int | None = 100,
                 check_timeout_s: float = 3.0) -> None:
        if not base_url:
            raise ToolkitError("goals.base_url is empty: set it to the server's OpenAI-compatible URL, e.g. "
                               "http://localhost:8000/v1")
        if max_goals < 1:
            raise ToolkitError(f"goals.max_goals={max_goals}: must be at least 1")
        try:
            prompt.format(caption="", goal_list="")
        except (KeyError, IndexError, ValueError) as e:
            raise ToolkitError(f"goals.prompt: a template with {{caption}} and optionally {{goal_list}} only "
                               f"({e!r})") from None
        if goals is not None and not list(goals):
            raise ToolkitError("goals.goals is empty: no suggestion could be kept; null keeps every parsed goal")
        if "{caption}" not in prompt:
            raise ToolkitError("goals.prompt has no {caption}: the model would never see the state")
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.timeout_s, self.max_retries, self.check_timeout_s = timeout_s, max_retries, check_timeout_s
        self.temperature, self.max_goals, self.max_tokens = temperature, max_goals, max_tokens
        self.prompt, self.system = prompt, system
        self.goals = list(goals) if goals is not None else None
        # vocabulary matching on cleaned forms, answering the vocabulary's own spelling
        self._vocab = {_clean(g): g for g in self.goals} if self.goals is not None else None
        self._client: openai.OpenAI | None = None  # built on first use: the object stays picklable until then
        self._cache: dict[str, list[str]] = {}
        self.calls = self.cache_hits = self.unparsable = self.failures = 0

    # --- the client ------------------------------------------------------------------------------------------
    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            # vLLM's convention: a server started without --api-key accepts any key, but the client wants one
            key = os.environ.get(self.api_key_env) or "EMPTY"
            self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout_s,
                                         max_retries=self.max_retries)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # an HTTP connection pool does not travel to another process

    def check(self) -> None:
        """One cheap request (``GET /models``) with a short timeout and no retries: an unreachable server or a
        refused key is a ToolkitError now, not an empty suggestion list at every step of training."""
        try:
            listed = self.client.with_options(timeout=self.check_timeout_s, max_retries=0).models.list()
        except openai.APIConnectionError as e:  # refused, unresolvable, or timed out
            raise ToolkitError(f"goals.base_url={self.base_url}: no OpenAI-compatible server answers there ({e}); "
                               f"start the language-model server (e.g. `vllm serve {self.model}`) or set "
                               f"goals.base_url to where it runs") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise ToolkitError(self._key_message(e)) from None
        except openai.APIStatusError as e:  # reachable; some servers have no /models: the first request will tell
            log.warning("goals.base_url=%s answered HTTP %d to GET /models; going on", self.base_url, e.status_code)
            return
        ids = [m.id for m in listed.data]
        if ids and self.model not in ids:  # a warning: some servers resolve aliases they do not list
            log.warning("goals.model=%s is not among the models %s lists: %s", self.model, self.base_url,
                        ", ".join(ids[:20]))

    def _key_message(self, e: openai.APIStatusError) -> str:
        where = f"${self.api_key_env}" if os.environ.get(self.api_key_env) else f"no key (${self.api_key_env} is unset)"
        return (f"goals.base_url={self.base_url} refused the API key (HTTP {e.status_code}, sent {where}): set "
                f"{self.api_key_env} to a valid key, or goals.api_key_env to the variable that holds it")

    # --- suggestions -----------------------------------------------------------------------------------------
    def suggest(self, caption: str, context: dict | None = None) -> list[str]:
        """Goals for the state ``caption`` (``context`` is unused: the caption is all the model sees, and the
        cache key)."""
        if caption in self._cache:
            self.cache_hits += 1
            return list(self._cache[caption])
        reply = self._ask(caption)
        if reply is None:  # failed: not cached, a later step asks again
            return []
        goals = self._select(parse_goals(reply))
        if not goals:
            self.unparsable += 1
            if self.unparsable & (self.unparsable - 1) == 0:  # the 1st, 2nd, 4th, 8th... time: visible, not a flood
                log.warning("goals: no goals in %s's reply (%d so far) to %r: %r", self.model, self.unparsable,
                            caption[:200], reply[:300])
        # an unparsable reply is cached too: at a fixed prompt (and temperature 0) asking again repeats it
        self._cache[caption] = goals
        return list(goals)

    def _ask(self, caption: str) -> str | None:
        goal_list = f"Possible goals: {', '.join(self.goals)}.\n" if self.goals else ""
        messages = [{"role": "system", "content": self.system},
                    {"role": "user", "content": self.prompt.format(caption=caption, goal_list=goal_list)}]
        extra = {"max_tokens": self.max_tokens} if self.max_tokens is not None else {}
        self.calls += 1
        try:
            response = self.client.chat.completions.create(model=self.model, messages=messages,
                                                           temperature=self.temperature, **extra)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:  # every later request would fail too
            raise ToolkitError(self._key_message(e)) from None
        except openai.NotFoundError:
            raise ToolkitError(f"goals.model={self.model}: {self.base_url} answered HTTP 404 to the chat completion; "
                               f"set goals.model to a model the server serves, and goals.base_url to its OpenAI "
                               f"API root (usually ending in /v1)") from None
        except openai.APIError as e:  # timeout, connection, 5xx / 429 after the retries, malformed answer
            self.failures += 1
            if self.failures & (self.failures - 1) == 0:
                log.warning("goals: request to %s failed after %d retries (%d failures so far): %s", self.base_url,
                            self.max_retries, self.failures, e)
            return None
        choices = response.choices or []
        return (choices[0].message.content or "") if choices else ""

    def _select(self, parsed: list[str]) -> list[str]:
        """``parsed`` restricted to the vocabulary (when there is one), at most ``max_goals``."""
        if self._vocab is None:
            return parsed[:self.max_goals]
        out: list[str] = []
        for goal in parsed:
            if goal in self._vocab:
                out.append(self._vocab[goal])
                continue
            padded = " " + " ".join(w for w in goal.split() if w not in _FILLERS) + " "
            out += [v for k, v in self._vocab.items() if f" {k} " in padded]
        return list(dict.fromkeys(out))[:self.max_goals]

    def stats(self) -> dict[str, float]:
        """Counters for logging: requests made, answers from the cache, replies without goals, failed requests."""
        return {"calls": float(self.calls), "cache_hits": float(self.cache_hits),
                "unparsable": float(self.unparsable), "failures": float(self.failures)}
