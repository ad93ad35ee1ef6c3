"""`specmesh chat` against a real HTTP gateway over the in-memory backend and store: turns
continue the stored conversation, /new starts over, errors are said and the chat goes on."""

from __future__ import annotations

from typer.testing import CliRunner

from services.gateway.response_store import MemoryResponseStore
from shared.cli.main import app as cli
from tests.test_batch import serving, tok  # noqa: F401
from tests.test_gateway_api import FakeBackend
from tests.test_gateway_tools import answer_with, prompt_of


def test_a_chat_continues_its_conversation_and_starts_over(tok, monkeypatch):  # noqa: F811
    backend = FakeBackend(tok)
    backend.max_context = 4096
    answer_with(backend, "Bonjour.")
    with serving(backend, store=MemoryResponseStore()) as url:
        result = CliRunner().invoke(cli, ["chat", "--url", url, "--system", "Be French.", "--temperature", "0"],
                                    input="Hi\n\nAgain\n/new\nFresh\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Bonjour.") == 3
    prompts = [backend.tok.decode(job.prompt) for job in backend.jobs]
    assert prompts == ["System: Be French.\nUser: Hi\nAssistant:",
                       "System: Be French.\nUser: Hi\nAssistant: Bonjour.\nUser: Again\nAssistant:",
                       "System: Be French.\nUser: Fresh\nAssistant:"]
    assert "tokens" in result.stderr and "chain" in result.stderr


def test_a_refused_turn_is_said_and_the_chat_goes_on(tok):  # noqa: F811
    backend = FakeBackend(tok)
    backend.max_context = 4096
    answer_with(backend, "Ok.")
    with serving(backend, store=MemoryResponseStore()) as url:
        result = CliRunner().invoke(cli, ["chat", "--url", url, "--chain", "oracle,target"], input="Hi\n")
        assert result.exit_code == 0 and "error 400" in result.stderr and "oracle" in result.stderr
        fine = CliRunner().invoke(cli, ["chat", "--url", url], input="Hi\n")
    assert "Ok." in fine.stdout
    gone = CliRunner().invoke(cli, ["chat", "--url", "http://127.0.0.1:9"], input="Hi\n")
    assert gone.exit_code == 0 and "no answer" in gone.stderr
