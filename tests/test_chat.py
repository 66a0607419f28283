"""``python -m rlhf_lightning chat``: driven through a real pseudo-terminal, replies checked against greedy generation
computed here through the same :class:`GenerationWorker`; streaming, context trimming and bad options in-process."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, child_env, run_cli

from rlhf_lightning.chat import Chat, Sampling, TerminalStreamer, repl, stop_token_ids
from rlhf_lightning.models import TINY_PRESET_DIR, load_tokenizer
from rlhf_lightning.rollout.workers import GenerationWorker

MAX_NEW = 8


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with untied embeddings, saved with weights: a random model with tied embeddings greedily
    repeats the prompt's last token (``<|assistant|>``, a special token), so its replies would all print empty."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("chat-model")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(TINY_PRESET_DIR, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_PRESET_DIR).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def worker(chat_model_dir: Path) -> GenerationWorker:
    return GenerationWorker(str(chat_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir: Path):
    return load_tokenizer(str(chat_model_dir), padding_side="left")


def greedy_reply(worker: GenerationWorker, tokenizer, turns: list[str]) -> str:
    """The greedy reply to the last of ``turns`` (alternating user/assistant messages), rendered here with the chat
    template independently of the chat module."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = worker.generate([ids], 1, MAX_NEW, 0.0, 1.0, 0, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    return tokenizer.decode(out["responses"][0], skip_special_tokens=True)


class Terminal:
    """A command running on a pseudo-terminal (its controlling terminal, so Ctrl-C and Ctrl-D work as typed)."""

    def __init__(self, argv: list[str]) -> None:
        env = child_env({"TERM": "dumb", "OMP_NUM_THREADS": "1"})
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the command
            # Ctrl-C must interrupt it as on a user's terminal, also when the suite itself was started in the
            # background (a non-interactive shell starts `cmd &` with SIGINT ignored, and exec keeps that).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.chdir(REPO)
            os.execvpe(argv[0], argv, env)
        self.pending = ""

    def read_until(self, marker: str, timeout: float = 90) -> str:
        """Everything printed up to and including ``marker`` (``\\r\\n`` as ``\\n``); fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.fd, 4096).decode(errors="replace") if ready else ""
            if not chunk:
                pytest.fail(f"no {marker!r} within {timeout} s; the terminal shows:\n{self.pending}")
            self.pending = (self.pending + chunk).replace("\r\n", "\n")
        end = self.pending.index(marker) + len(marker)
        text, self.pending = self.pending[:end], self.pending[end:]
        return text

    def type(self, text: str) -> None:
        time.sleep(0.2)  # let readline put the terminal in its mode first, as a person typing would
        os.write(self.fd, text.encode())

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.read(self.fd, 4096)  # drain, so the child never blocks on a full terminal
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        pytest.fail("the chat did not exit")

    def close(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture
def terminal():
    started: list[Terminal] = []

    def start(model: Path, *extra: str) -> Terminal:
        started.append(Terminal([sys.executable, "-m", "rlhf_lightning", "chat", "--model", str(model),
                                 "--temperature", "0", "--max_new_tokens", str(MAX_NEW), *extra]))
        return started[-1]

    yield start
    for term in started:
        term.close()


def test_chat_in_a_terminal_streams_greedy_replies_keeps_history_and_resets(terminal, chat_model_dir, worker,
                                                                           tokenizer):
    first = greedy_reply(worker, tokenizer, ["hello"])
    second = greedy_reply(worker, tokenizer, ["hello", first, "how are you"])
    assert first and second and second != greedy_reply(worker, tokenizer, ["how are you"])  # history matters

    term = terminal(chat_model_dir)
    assert "greedy" in term.read_until(">>> ")
    term.type("hello\n")
    assert term.read_until(">>> ") == f"hello\n{first}\n>>> "  # echo, streamed reply, next prompt
    term.type("half a messa\x03")  # Ctrl-C: the line is dropped (the next reply shows it was not sent)
    assert term.read_until(">>> ").endswith("\n>>> ")
    term.type("how are you\n")
    assert term.read_until(">>> ") == f"how are you\n{second}\n>>> "  # the first exchange is in the prompt
    term.type("/reset\n")
    assert "[conversation cleared]" in term.read_until(">>> ")
    term.type("hello\n")
    assert term.read_until(">>> ") == f"hello\n{first}\n>>> "  # a fresh conversation again
    term.type("/help\n")
    assert "/reset" in term.read_until(">>> ")
    term.type("/exit\n")
    assert term.exit_code() == 0


def test_piped_input_ending_quits_cleanly(chat_model_dir, worker, tokenizer, monkeypatch, capsys):
    """End of input (Ctrl-D on a terminal, the end of a pipe) ends the chat normally: the real command, in-process."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    run_cli(["chat", "--model", str(chat_model_dir), "--temperature", "0", "--max_new_tokens", str(MAX_NEW)])
    assert capsys.readouterr().out.endswith(f">>> {greedy_reply(worker, tokenizer, ['hello'])}\n>>> \n")


def test_tokens_are_streamed_while_generating(worker, tokenizer):
    """Each chunk is written between decoding steps (when it arrives the model has run fewer forwards than it runs in
    all), and the chunks add up to the reply ``generate`` returns."""
    forwards, chunks = [0], []
    hook = worker.model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    try:
        out = worker.generate([tokenizer(text, add_special_tokens=False)["input_ids"]], 1, MAX_NEW, 0.0, 1.0, 0,
                              [tokenizer.eos_token_id], tokenizer.pad_token_id,
                              streamer=TerminalStreamer(tokenizer, lambda t: chunks.append((t, forwards[0]))))
    finally:
        hook.remove()
    assert "".join(t for t, _ in chunks) == tokenizer.decode(out["responses"][0], skip_special_tokens=True)
    arrivals = [n for _, n in chunks]
    assert len(chunks) >= 3 and arrivals == sorted(set(arrivals))  # one chunk per decoding step or so
    assert arrivals[0] <= 2 < forwards[0] == MAX_NEW  # the first text is out after the first step, not at the end


def make_chat(worker, tokenizer, written: list[str], **kwargs) -> Chat:
    return Chat(worker, tokenizer, Sampling(MAX_NEW, 0.0, 1.0, 0), stop_token_ids(tokenizer, None),
                write=written.append, **kwargs)


def test_each_turn_rerenders_the_whole_conversation_with_the_chat_template(worker, tokenizer):
    written: list[str] = []
    chat = make_chat(worker, tokenizer, written, system="Be brief.")
    reply = chat.send("hello")
    assert "".join(written) == reply + "\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": reply}, {"role": "user", "content": "again"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(chat.prompt_ids("again")) == expected


def test_input_template_renders_every_turn_with_eos(worker, tokenizer):
    chat = make_chat(worker, tokenizer, [], input_template="Q: {}\nA: ")
    chat.exchanges = [("one", "1")]
    expected = tokenizer("Q: one\nA: 1" + tokenizer.eos_token + "Q: two\nA: ")["input_ids"]
    assert chat.prompt_ids("two") == expected


def test_oldest_exchanges_are_dropped_whole_to_fit_the_context(worker, tokenizer):
    written: list[str] = []
    chat = make_chat(worker, tokenizer, written)
    chat.exchanges = [("first question", "first answer"), ("second question", "second answer"),
                      ("third question", "third answer")]
    kept = chat.encode(chat.exchanges[2:], "new")
    chat.context = len(kept) + MAX_NEW  # room for the last exchange and the new message only
    assert chat.prompt_ids("new") == kept
    assert chat.exchanges == [("third question", "third answer")]
    assert written == [f"[dropped the oldest 2 exchange(s) to fit the model's {chat.context}-token context]\n"]
    written.clear()
    assert chat.send("a message far too long " * 20) is None  # alone it does not fit: refused, not cut
    assert written[0].startswith("[not sent: this message needs") and chat.exchanges == [("third question",
                                                                                           "third answer")]


def test_ctrl_c_during_a_reply_discards_it_and_commands_are_answered(worker, tokenizer):
    written: list[str] = []

    def write(text: str) -> None:
        written.append(text)
        if text.startswith(first_chunk) and not chat.exchanges and "interrupted" not in "".join(written):
            raise KeyboardInterrupt  # Ctrl-C while the first reply streams

    first_chunk = greedy_reply(worker, tokenizer, ["hello"])[:1]
    chat = make_chat(worker, tokenizer, written)
    chat.write = write
    lines = iter(["/nope", "hello", "", "hello", "/exit", "never read"])
    repl(chat, lambda prompt: next(lines))
    out = "".join(written)
    assert "[unknown command /nope; /help lists the commands]" in out
    assert "[interrupted: this reply is not kept]" in out
    assert chat.exchanges == [("hello", greedy_reply(worker, tokenizer, ["hello"]))]  # only the finished reply
    assert next(lines) == "never read"  # /exit stopped reading


def test_stop_tokens_add_the_models_end_of_turn_tokens(tokenizer):
    assert stop_token_ids(tokenizer, None) == [tokenizer.eos_token_id]
    assert stop_token_ids(tokenizer, [tokenizer.eos_token_id, 7]) == [tokenizer.eos_token_id, 7]
    assert stop_token_ids(tokenizer, 9) == [tokenizer.eos_token_id, 9]


@pytest.fixture(scope="module")
def no_template_dir(tmp_path_factory: pytest.TempPathFactory, chat_model_dir: Path) -> Path:
    """A tokenizer directory without a chat template."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("no-template")
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    tok.chat_template = None
    tok.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "--model='/no/such/model' does not exist"),
    (["--model", "{empty}"], "has no weights"),
    (["--model", "tiny-llama", "--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    (["--model", "tiny-llama", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--model", "tiny-llama", "--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
    (["--model", "tiny-llama", "--tempreature", "0"], "unrecognized arguments: --tempreature"),
    (["--temperature", "0"], "the following arguments are required: --model"),
    (["--model", "tiny-llama", "--input_template", "Q: A:"], "has no '{}' where the message goes"),
    (["--model", "tiny-llama", "--input_template", "Q: {}", "--system", "hi"], "--system needs the chat template"),
    (["--model", "tiny-llama", "--tokenizer", "{no_template}"], "has no chat template: pass --input_template"),
    (["--model", "tiny-llama", "--max_new_tokens", "5000"], "leaves no room for a prompt"),
], ids=["missing-model", "no-weights", "top_p", "temperature", "max_new_tokens", "typo", "no-model", "template",
        "system+template", "no-chat-template", "too-long"])
def test_bad_options_end_with_one_error_line_and_exit_2(args, message, tmp_path, no_template_dir, capsys):
    args = [a.replace("{empty}", str(tmp_path)).replace("{no_template}", str(no_template_dir)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["chat", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not [line for line in err[:-1] if not line.startswith("loading ")], err  # nothing but the error
