"""The command line: help everywhere, one-line errors (never a traceback) for user mistakes."""

import subprocess
import sys
from pathlib import Path

import pytest

from entityclip.cli import build_parser, main

ENTITYCLIP = str(Path(sys.executable).parent / "entityclip")
COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_console_script_lists_every_stage():
    out = subprocess.run([ENTITYCLIP, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("data", "explain", "train", "index", "evaluate", "serve", "query", "pipeline", "compare", "promote",
                    "submit"):
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: entityclip" in capsys.readouterr().out


def test_config_prints_loadable_yaml(capsys, tmp_path):
    assert main(["config", "--set", "train.epochs=3"]) == 0
    path = tmp_path / "c.yaml"
    path.write_text(capsys.readouterr().out)
    assert main(["config", "--config", str(path)]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ENTITYCLIP, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["config", "--config", "/nonexistent.yaml"], "config file not found"),
    (["config", "--set", "train.epochs=many"], "expected int"),
    (["index", "--root", "/nonexistent/run"], "run `entityclip train` first"),
    (["pipeline", "--variants", "gpt5"], "unknown variant"),
    (["query", "--url", "http://127.0.0.1:9", "--text", "x"], "cannot reach"),
    (["query", "--url", "http://127.0.0.1:9"], "give --text, --image, or both"),
])
def test_user_errors_are_one_clear_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_explain_without_data_names_the_missing_step(tmp_path):
    result = run_cli("explain", "--root", str(tmp_path))
    assert result.returncode == 2 and "run `entityclip data` first" in result.stderr


def test_train_with_unreachable_tracking_server_fails_before_training(tmp_path):
    from tests.conftest import free_port

    # Explanations must exist for training to get as far as tracking.
    (tmp_path / "explanations.parquet").write_bytes(b"")
    result = run_cli("train", "--root", str(tmp_path), "--set", f"tracking.uri=http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "unreachable" in result.stderr and "Traceback" not in result.stderr


def test_query_sends_a_search_again_when_the_connection_breaks_before_an_answer(capsys):
    """A replica that dies mid-request closes the connection with no answer; searches are
    read-only, so the client replays them."""
    import json
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    seen = []

    def serve_two():
        for attempt in range(2):
            conn, _ = server.accept()
            seen.append(conn.recv(65536))
            if attempt == 1:
                body = json.dumps({"explanation": "", "results": [], "model": {"variant": "x"}}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            conn.close()  # the first attempt: closed without a response

    thread = threading.Thread(target=serve_two, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    assert main(["query", "--url", url, "--text", "Velmora Rovers"]) == 0
    thread.join(10)
    assert len(seen) == 2 and all(b"POST /search/text" in request for request in seen)
    assert json.loads(capsys.readouterr().out)["model"] == {"variant": "x"}
