"""A terminal chat with a checkpoint: `python -m ghostvis_jax.chat --checkpoint CKPT`.

Type a message and press Enter; the reply streams as it is generated. Commands:
  /image PATH   attach an image to your next message (several may be attached)
  /reset        forget the conversation and any attached image
  /quit         leave (end of input works too)
A bad image or a failed reply prints an error naming the cause; the session goes on.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from ghostvis_jax.data.chat import IMAGE_PLACEHOLDER
from ghostvis_jax.data.images import ImageDecodeError, load_image

HELP = "commands: /image PATH (attach to the next message), /reset, /quit"


class ChatSession:
    """The conversation so far: messages, the images they hold (in placeholder order), pending attachments."""

    def __init__(self, model, out: TextIO, **generate_kwargs: Any):
        self.model, self.out, self.generate_kwargs = model, out, generate_kwargs
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.images: list = []
        self.pending: list = []
        self.turn = 0

    def attach(self, path: str) -> None:
        self.pending.append(load_image(path))

    def send(self, text: str) -> str:
        """Generate a reply to `text` (with the pending images), streaming it to `out`."""
        prefix = IMAGE_PLACEHOLDER * len(self.pending) + ("\n" if self.pending else "")
        messages = self.messages + [{"role": "user", "content": prefix + text}]
        images = self.images + self.pending
        streamed: list[str] = []

        def write(_row: int, piece: str) -> None:
            streamed.append(piece)
            self.out.write(piece)
            self.out.flush()

        kwargs = dict(self.generate_kwargs)
        kwargs["seed"] = kwargs.get("seed", 0) + self.turn  # reproducible, but not the same draw every turn
        reply = self.model.generate({"messages": messages, "images": images}, stream=write, **kwargs)[0]
        shown = "".join(streamed)
        self.out.write((reply[len(shown):] if reply.startswith(shown) else "") + "\n")
        self.out.flush()
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.images, self.pending = images, []
        self.turn += 1
        return reply


def run(session: ChatSession, stdin: TextIO, interactive: bool) -> None:
    out = session.out
    while True:
        if interactive:
            out.write(f"you{' [+%d image]' % len(session.pending) if session.pending else ''}> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            session.reset()
            out.write("[conversation reset]\n")
        elif command == "/image":
            if not arg.strip():
                out.write("[error] usage: /image PATH\n")
                continue
            try:
                session.attach(arg.strip())
                out.write(f"[image attached: {arg.strip()}]\n")
            except ImageDecodeError as e:
                out.write(f"[error] image not attached: {e}\n")
        elif command.startswith("/"):
            out.write(f"[error] unknown command {command}; {HELP}\n")
        else:
            try:
                session.send(line)
            except Exception as e:  # a failed reply must not end the session
                out.write(f"\n[error] no reply: {type(e).__name__}: {e}\n")
        out.flush()


def main(argv=None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ghostvis_jax.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    args = p.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    import jax

    import ghostvis_jax as gv

    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    from ghostvis_jax.checkpoint import CheckpointError

    try:
        model = gv.load(args.checkpoint, dtype=dtype)
    except CheckpointError as e:  # missing / incomplete / corrupt folder: a message, not a traceback
        sys.stderr.write(f"error: {e}\n")
        return 2
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"GhostVis chat ({args.checkpoint}). {HELP}\n")
    session = ChatSession(model, stdout, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, system_prompt=args.system)
    run(session, stdin, interactive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
