"""`mmstack chat` (round 3 of the adversarial cases, docs/limits.md): a turn that cannot run (an `/image` path that
is not there, a turn over a limit) is reported in one line and dropped; the conversation goes on instead of the
command exiting with the whole history lost."""
from __future__ import annotations

import io

from mmstack.apps.cli import main


def test_a_bad_image_drops_its_turn_and_the_chat_goes_on(monkeypatch, capsys):
    turns = "/image /no/such/picture.png\nwhat is it?\nhello\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    assert main(["chat", "--device", "cpu", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "/no/such/picture.png: no such file" in err and "turn dropped" in err
    assert err.count("turn dropped") == 1 and out.endswith("\n")  # the next turn was answered
