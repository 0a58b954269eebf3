"""`nx chat` in a real terminal: tmux runs it, send-keys types, capture-pane reads the screen."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (apt-get install tmux; scripts/setup.sh tries)")

PROMPT = ">>> "


class Terminal:
    """A detached tmux session of its own server (socket in a temp dir), 200 columns wide."""

    def __init__(self, socket: str, command: str) -> None:
        self.base = ["tmux", "-S", socket]
        subprocess.run([*self.base, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "60", command], check=True)

    def screen(self) -> list[str]:
        out = subprocess.run([*self.base, "capture-pane", "-p", "-J", "-S", "-200", "-t", "chat"],
                             capture_output=True, text=True, check=True).stdout
        return out.rstrip("\n").split("\n")

    def type(self, text: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "chat", "-l", text], check=True)
        subprocess.run([*self.base, "send-keys", "-t", "chat", "Enter"], check=True)

    def wait(self, done, timeout: float = 45.0) -> list[str]:
        """The screen once `done(screen lines)` holds (polled), else fail showing the screen."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = self.screen()
            if done(lines):
                return lines
            time.sleep(0.2)
        pytest.fail("timed out; the terminal shows:\n" + "\n".join(self.screen()))

    def prompts(self, lines: list[str]) -> int:
        return sum(line.startswith(PROMPT.rstrip()) for line in lines)

    def say(self, text: str) -> str:
        """Type a message and return the answer: the lines between its echo and the next prompt."""
        before = self.prompts(self.screen())
        self.type(text)
        lines = self.wait(lambda ls: self.prompts(ls) > before and ls[-1].startswith(PROMPT.rstrip()))
        start = max(i for i, line in enumerate(lines) if line == PROMPT + text)
        return "\n".join(lines[start + 1 : -1])

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def test_chat_keeps_history_resets_and_exits(llama_chat_ckpt, tmp_path):
    """Greedy answers: the same message asked again (history included) is answered differently;
    after /reset (which keeps --system) it is answered exactly as the first time; /exit exits 0."""
    env = {"NX_CACHE_DIR": os.environ["NX_CACHE_DIR"], "TOKENIZERS_PARALLELISM": "false", "JAX_NUM_CPU_DEVICES": "1"}
    chat = [sys.executable, "-m", "nx.cli", "chat", llama_chat_ckpt, "--system", "Be brief.", "-n", "12",
            "--n-positions", "64", "--context-length-estimate", "32", "--quiet"]
    command = (f"cd {shlex.quote(os.getcwd())} && env {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())} "
               f"{shlex.join(chat)}; echo \"nx chat exited $?\"; sleep 60")
    term = Terminal(str(tmp_path / "tmux.sock"), command)
    try:
        term.wait(lambda ls: ls[-1] == PROMPT.rstrip() or ls[-1] == PROMPT, timeout=50)
        first = term.say("Hello")
        again = term.say("Hello")
        assert first.strip() and again.strip(), term.screen()
        assert again != first  # the second turn saw the first one
        term.type("/reset")
        term.wait(lambda ls: "(conversation cleared)" in ls)
        assert term.say("Hello") == first
        term.type("/exit")
        term.wait(lambda ls: "nx chat exited 0" in ls)
    finally:
        term.close()
