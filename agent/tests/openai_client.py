"""The official OpenAI Python client against a running `xpyd-agent up`.

Run by agent/tests/openai_client.rs as
    <venv python> openai_client.py <base URL> <model>
Exits non-zero (with the failed check's message) unless every call a user
would make works: models.list, chat and text completions, whole and
streamed (with stream_options.include_usage), and the typed errors.
"""

import sys
import urllib.request

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
FRANCE = [{"role": "user", "content": "Name the capital of France."}]
# The same conversation written out with SmolLM2's chat template, for the
# text completions API.
FRANCE_TEXT = "<|im_start|>user\nName the capital of France.<|im_end|>\n<|im_start|>assistant\n"


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split(":")[0], flush=True)


def usage_adds_up(usage, what):
    check(
        usage is not None
        and usage.prompt_tokens > 0
        and usage.completion_tokens > 0
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{what} usage adds up: {usage}",
    )


models = client.models.list()
ids = [m.id for m in models.data]
check(model in ids, f"models.list shows the served model: {ids}")

# Chat, whole.
chat = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=32)
answer = chat.choices[0].message.content
check("Paris" in answer, f"chat answer names Paris: {answer!r}")
check(chat.choices[0].finish_reason == "stop", f"chat finish_reason is stop: {chat.choices[0].finish_reason}")
check(chat.choices[0].message.role == "assistant", f"chat role: {chat.choices[0].message.role}")
usage_adds_up(chat.usage, "chat")

# Chat, streamed, with usage in a last chunk.
pieces, finish, usage, chunks = [], None, None, 0
for chunk in client.chat.completions.create(
    model=model, messages=FRANCE, temperature=0, max_tokens=32, stream=True,
    stream_options={"include_usage": True},
):
    chunks += 1
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage is not None:
        check(not chunk.choices, f"the usage chunk has no choices: {chunk}")
        usage = chunk.usage
streamed = "".join(pieces)
check(chunks > 2, f"chat streams in several chunks: {chunks}")
check(streamed == answer, f"streamed chat text equals the whole one: {streamed!r} vs {answer!r}")
check(finish == "stop", f"streamed chat finish_reason is stop: {finish}")
usage_adds_up(usage, "streamed chat")
check(usage.completion_tokens == chat.usage.completion_tokens
      and usage.prompt_tokens == chat.usage.prompt_tokens,
      f"streamed chat usage equals the whole one: {usage} vs {chat.usage}")

# Text completions, whole: the chat turn written out (without the template's
# default system prompt) is answered too.
comp = client.completions.create(model=model, prompt=FRANCE_TEXT, temperature=0, max_tokens=32)
text = comp.choices[0].text
check("Paris" in text, f"completion names Paris: {text!r}")
check(comp.choices[0].finish_reason == "stop", f"completion finish_reason is stop: {comp.choices[0].finish_reason}")
usage_adds_up(comp.usage, "completion")

# Text completions cut by max_tokens: finish_reason length, exactly 5 tokens.
short = client.completions.create(model=model, prompt=FRANCE_TEXT, temperature=0, max_tokens=5)
check(short.choices[0].finish_reason == "length", f"max_tokens cut gives length: {short.choices[0].finish_reason}")
check(short.usage.completion_tokens == 5, f"max_tokens=5 gives 5 tokens: {short.usage}")
check(text.startswith(short.choices[0].text), f"the cut text is a prefix: {short.choices[0].text!r}")
echoed = client.completions.create(model=model, prompt=FRANCE_TEXT, temperature=0, max_tokens=5, echo=True)
check(echoed.choices[0].text == FRANCE_TEXT + short.choices[0].text,
      f"echo puts the prompt before the completion: {echoed.choices[0].text!r}")
try:
    client.completions.create(model=model, prompt=FRANCE_TEXT, max_tokens=5, echo=True, logprobs=1)
    check(False, "echo with logprobs is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.body.get("param") == "echo", f"echo with logprobs is a 400 naming echo: {e}")

# Text completions, streamed, with usage.
pieces, finish, usage = [], None, None
for chunk in client.completions.create(
    model=model, prompt=FRANCE_TEXT, temperature=0, max_tokens=32, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage is not None:
        usage = chunk.usage
check("".join(pieces) == text, f"streamed completion equals the whole one: {''.join(pieces)!r}")
check(finish == "stop", f"streamed completion finish_reason is stop: {finish}")
usage_adds_up(usage, "streamed completion")
check(usage.completion_tokens == comp.usage.completion_tokens,
      f"streamed completion usage equals the whole one: {usage} vs {comp.usage}")

# Logprobs at temperature 0: the chosen token is the most likely of its
# top_logprobs, whole and streamed, and both give the same tokens.
def check_logprobs(content, what):
    check(content, f"{what} has logprobs")
    tops = [entry.top_logprobs for entry in content]
    check(all(len(top) == 5 for top in tops), f"{what}: five top_logprobs each: {tops}")
    check(all(a.logprob >= b.logprob for top in tops for a, b in zip(top, top[1:])), f"{what}: sorted: {tops}")
    check(all(e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob for e in content),
          f"{what}: the chosen token has the largest logprob: {content}")
    check(all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content),
          f"{what}: bytes spell the token: {content}")


lp = client.chat.completions.create(
    model=model, messages=FRANCE, temperature=0, max_tokens=32, logprobs=True, top_logprobs=5,
)
check(lp.choices[0].message.content == answer, f"logprobs do not change the answer: {lp.choices[0].message.content!r}")
check_logprobs(lp.choices[0].logprobs.content, "chat logprobs")
streamed_lp = []
for chunk in client.chat.completions.create(
    model=model, messages=FRANCE, temperature=0, max_tokens=32, logprobs=True, top_logprobs=5, stream=True,
):
    if chunk.choices and chunk.choices[0].logprobs is not None:
        streamed_lp.extend(chunk.choices[0].logprobs.content or [])
check_logprobs(streamed_lp, "streamed chat logprobs")
check([e.token for e in streamed_lp] == [e.token for e in lp.choices[0].logprobs.content],
      "streamed logprobs cover the same tokens")

# A prompt longer than --max-local-prefill-length: its first token is sampled
# on the prefill worker, and its logprobs travel with the KV.
LONG = [{"role": "system", "content": "You are a helpful assistant. " * 16}] + FRANCE
remote = client.chat.completions.create(
    model=model, messages=LONG, temperature=0, max_tokens=4, logprobs=True, top_logprobs=5,
)
check_logprobs(remote.choices[0].logprobs.content, "remote-prefill logprobs")
check(len(remote.choices[0].logprobs.content) == remote.usage.completion_tokens,
      f"the remotely sampled first token has logprobs too: {remote.choices[0].logprobs}")
metrics = urllib.request.urlopen(base_url + "/metrics", timeout=30).read().decode()
remote_prefills = sum(
    float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
    if line.startswith("xpyd_decode_prefills_total{") and 'location="remote"' in line
)
check(remote_prefills >= 1, f"the long prompt was prefilled remotely: {remote_prefills}")

# Legacy completions logprobs.
clp = client.completions.create(model=model, prompt=FRANCE_TEXT, temperature=0, max_tokens=5, logprobs=2)
l = clp.choices[0].logprobs
check(len(l.tokens) == len(l.token_logprobs) == len(l.top_logprobs) == len(l.text_offset) == 5,
      f"completion logprobs are parallel lists of 5: {l}")
check(all(max(t.values()) == v for t, v in zip(l.top_logprobs, l.token_logprobs)),
      f"completion: the chosen token is the most likely: {l}")

# n=3 with a seed: three choices, each its own sample, the same on a second call.
def three():
    r = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=1.0, max_tokens=12, n=3, seed=1234,
    )
    check([c.index for c in r.choices] == [0, 1, 2], f"n=3 gives choices 0, 1, 2: {r.choices}")
    return r


n1, n2 = three(), three()
texts = [c.message.content for c in n1.choices]
check(texts == [c.message.content for c in n2.choices], f"n=3 with a seed is reproducible: {texts}")
check(len(set(texts)) > 1, f"the choices are sampled separately: {texts}")
check(n1.usage.prompt_tokens == chat.usage.prompt_tokens, f"n=3 counts the prompt once: {n1.usage}")
usage_adds_up(n1.usage, "n=3")

# Errors arrive as the client's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=FRANCE)
    check(False, "an unknown model is refused")
except openai.NotFoundError as e:
    check(e.status_code == 404 and "no-such-model" in str(e), f"unknown model is NotFoundError naming it: {e}")
try:
    client.chat.completions.create(model=model, messages=FRANCE, temperature=-1)
    check(False, "a negative temperature is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and "temperature" in str(e), f"negative temperature is BadRequestError naming it: {e}")
try:
    client.chat.completions.create(model=model, messages=FRANCE, n=17)
    check(False, "n=17 is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.body.get("param") == "n", f"n=17 is BadRequestError naming n: {e}")

print("all OpenAI client checks passed")
