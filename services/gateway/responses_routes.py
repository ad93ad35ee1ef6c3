"""The Responses API's routes: `POST /v1/responses` (a chat request underneath, `serve`d by
http_api), and the stored responses' `GET`, `GET .../input_items`, `DELETE` and `POST
.../cancel` (responses.py, response_store.py, background.py)."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse

from services.gateway.background import EVENTS_KEPT_S, BackgroundResponses, keeps_cancelled
from services.gateway.chat import chat_prompt
from services.gateway.generation import ApiError, invalid, unavailable
from services.gateway.openai_models import ERRORS
from services.gateway.response_store import StoreError
from services.gateway.responses import ResponsesRequest, output_messages, truncated
from services.gateway.tools import tool_plan

log = logging.getLogger("specmesh.gateway")

RESPONSE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # what the gateway's ids look like, and a valid store key


def register_responses(app: FastAPI, settings, backend, serve, background: BackgroundResponses, response_store) -> None:
    """Add the Responses API's routes to `app` (`backend()`, `serve(...)` and `response_store()` are http_api's)."""

    async def stored(response_id: str, param: str | None = None) -> dict:
        """A stored response's record; 404 if there is none (never stored, deleted, expired)."""
        store = response_store()
        if store is None:
            raise invalid("This gateway keeps no responses (gateway.responses_store is off); send the earlier turns "
                          "in `input`.", param)
        record = await _read(store.get, response_id) if RESPONSE_ID.match(response_id) else None
        if record is None:
            raise ApiError(404, f"No stored response has the id {response_id!r}: it was made with store: false, "
                                f"deleted, or is older than gateway.responses_ttl_s.", param=param,
                           code="response_not_found")
        return record

    @app.post("/v1/responses", responses=ERRORS)
    async def responses(body: ResponsesRequest, request: Request):
        """OpenAI's Responses API over the chat machinery (`responses.py`); `stream: true` for its events.
        Stored unless `store: false`; `previous_response_id` continues a stored one's conversation."""
        earlier: list[dict] = []
        if body.previous_response_id is not None:
            previous = await background.settle(response_store(), await stored(body.previous_response_id,
                                                                              "previous_response_id"))
            if previous.get("conversation") is None:  # a background response not (or never) finished
                raise invalid(f"The response {body.previous_response_id!r} is {previous['response']['status']}: "
                              f"there is no answer to continue yet.", "previous_response_id")
            earlier = previous["conversation"]
        chat = body.to_chat(earlier)
        tools = tool_plan(chat.tools, chat.tool_choice, chat.parallel_tool_calls)
        tok = backend().tokenizer()
        if body.truncation == "auto":
            room = backend().max_context - (body.max_output_tokens or 1)

            def fits(messages) -> bool:
                prompt = chat_prompt(tok, messages, tools)
                return len(prompt if isinstance(prompt, list) else tok.encode(prompt)) <= room

            chat.messages = truncated(chat.messages, fits)
        prompt = chat_prompt(tok, chat.messages, tools)
        store = response_store() if body.store is not False else None
        if body.background and store is None:
            raise invalid("background needs the response stored (store: true, gateway.responses_store on): poll "
                          "GET /v1/responses/{id} for it.", "background")

        async def keep(final: dict) -> None:
            record = {"response": final, "input_items": body.input_items(),
                      "conversation": [*earlier, *body.turn(), *output_messages(final["output"])]}
            metrics = getattr(backend(), "metrics", None)
            try:
                await store.put(final["id"], record)
            except StoreError as exc:
                log.warning("response %s answered but not stored: %s", final["id"], exc)
                final["store"] = False
            if metrics is not None:
                metrics.responses_stored.labels("stored" if final["store"] else "failed").inc()

        if store is not None and body.background:
            keep = keeps_cancelled(store, keep)
        return await serve(request, chat, "responses", [prompt], "input", tools, body, keep if store else None)

    @app.post("/v1/responses/{response_id}/cancel", responses=ERRORS)
    async def cancel_response(response_id: str) -> dict:
        """Stop a background response; it is given back `cancelled` (one already finished, as it is)."""
        record = await stored(response_id)
        if not record["response"].get("background"):
            raise invalid(f"Only a background response can be cancelled; {response_id!r} was answered whole.")
        return await background.cancel(response_store(), backend(), record)

    @app.get("/v1/responses/{response_id}", responses=ERRORS)
    async def get_response(response_id: str, stream: bool = False,
                           starting_after: int | None = Query(None, ge=-1)):
        """A stored response, as it was answered (a background one: as it stands). `stream=true`:
        a streamed background response's events again, those after `starting_after` (a
        sequence number) first, then the rest as they come."""
        record = await background.settle(response_store(), await stored(response_id))
        if not stream:
            if starting_after is not None:
                raise invalid("starting_after goes with stream=true (it resumes a background response's events).",
                              "starting_after")
            return record["response"]
        log = background.events(response_id)
        if log is None:
            raise invalid(f"The events of {response_id!r} are not here: only a response made with background and "
                          f"stream true has them, in the gateway generating it, until "
                          f"{EVENTS_KEPT_S / 60:g} minutes after it ends. GET it without stream.", "stream")
        return StreamingResponse(log.read(-1 if starting_after is None else starting_after),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache"})

    @app.get("/v1/responses/{response_id}/input_items", responses=ERRORS)
    async def response_input_items(response_id: str) -> dict:
        """The input items of a stored response (its own turn's, not the earlier turns')."""
        items = (await stored(response_id))["input_items"]
        return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None, "has_more": False}

    @app.delete("/v1/responses/{response_id}", responses=ERRORS)
    async def delete_response(response_id: str) -> dict:
        """Forget a stored response (a follow-up naming it is then a 404)."""
        await stored(response_id)
        await _read(response_store().delete, response_id)
        return {"id": response_id, "object": "response", "deleted": True}


async def _read(operation, response_id: str):
    """A response store's answer; 503 when the store cannot give one."""
    try:
        return await operation(response_id)
    except StoreError as exc:
        raise unavailable(f"Stored responses cannot be reached now ({exc}); retry shortly.") from None
