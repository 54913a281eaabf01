"""The AsyncAPI document as a page for people, rendered here (``GET /docs/asyncapi``).

Plain HTML with its style inline and no script: a closed network that reaches no CDN reads it
as well as any other, and so does a partner writing a NATS client in another language, who wants
the subjects, what to send there, what comes back and each payload's JSON Schema.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from typing import Any

_CODE = re.compile(r"`([^`]+)`")
_REF = r"#/components/schemas/([A-Za-z0-9_.-]+)"
_SCHEMA_REF = re.compile(f"&quot;{_REF}&quot;")
"""A schema reference in escaped JSON (what the page shows)."""
_JSON_REF = re.compile(f'"{_REF}"')
"""The same in JSON."""
_STYLE = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:70rem;padding:1rem 2rem;color:#1d232a}
h1{margin-bottom:.2rem}h2{margin-top:2.5rem;border-bottom:1px solid #d0d7de}h3{margin:1.6rem 0 .3rem;font-size:1rem}
code,pre{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
code{background:#f2f4f6;padding:0 .25rem;border-radius:3px}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;border-radius:4px}
.subject{font-size:15px}.tag{display:inline-block;font-size:12px;padding:0 .4rem;border-radius:3px;margin-right:.4rem;color:#fff}
.send{background:#1a7f37}.receive{background:#0969da}nav a{margin-right:1rem}details{margin:.3rem 0}
summary{cursor:pointer}table{border-collapse:collapse}td,th{text-align:left;padding:.15rem .8rem .15rem 0;vertical-align:top}
.schema h3{margin:.2rem 0;font-weight:normal}.schema pre{display:none}.schema:target pre{display:block}
.schema:target h3{font-weight:bold}
"""


def _text(value: Any) -> str:
    """A description: escaped, with its `code` spans set as code."""
    return _CODE.sub(r"<code>\1</code>", html.escape(str(value or "")))


def _json(value: Any) -> str:
    """Pretty JSON, escaped, its schema references linked to the schemas below."""
    shown = html.escape(json.dumps(value, indent=2, ensure_ascii=False))
    return _SCHEMA_REF.sub(r'<a href="#schema-\1">&quot;#/components/schemas/\1&quot;</a>', shown)


def _resolve(document: Mapping[str, Any], reference: str) -> Any:
    node: Any = document
    for part in reference.removeprefix("#/").split("/"):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    return node


def _message(document: Mapping[str, Any], message: Mapping[str, Any]) -> str:
    message = _resolve(document, message["$ref"]) if "$ref" in message else message
    payload = message.get("payload") or {}
    name = str(payload.get("$ref", "")).rpartition("/")[2]
    parts = [f"<p>{_text(message.get('title') or message.get('name'))}"]
    if name:
        parts.append(f' — payload <a href="#schema-{html.escape(name)}"><code>{html.escape(name)}</code></a>')
    parts.append("</p>")
    if payload and not name:
        parts.append(f"<details><summary>payload</summary><pre>{_json(payload)}</pre></details>")
    if message.get("headers"):
        parts.append(f"<details><summary>headers</summary><pre>{_json(message['headers'])}</pre></details>")
    return "".join(parts)


def _channel(document: Mapping[str, Any], key: str, channel: Mapping[str, Any], actions: Mapping[str, str]) -> str:
    action = actions.get(key)
    # The document speaks for the bus: it receives offers and sends the log; a partner does the opposite
    # (on the live subjects: the log's own are the bus's, which members' credentials do not reach).
    if action == "send" and key.startswith("log."):
        action = "own"
    tag = {"receive": '<span class="tag send">partner sends</span>', "send": '<span class="tag receive">partner receives</span>',
           "own": '<span class="tag">the bus\'s own</span>'}
    parts = [f'<section id="channel-{html.escape(key)}"><h3>{tag.get(action or "", "")}'
             f'<code class="subject">{html.escape(str(channel.get("address") or key))}</code></h3>',
             f"<p>{_text(channel.get('description'))}</p>"]
    parameters = channel.get("parameters") or {}
    if parameters:
        rows = "".join(f"<tr><td><code>{{{html.escape(name)}}}</code></td><td>{_text(p.get('description'))}</td></tr>"
                       for name, p in parameters.items())
        parts.append(f"<table>{rows}</table>")
    for message in (channel.get("messages") or {}).values():
        parts.append(_message(document, message))
    parts.append("</section>")
    return "".join(parts)


def domains(document: Mapping[str, Any]) -> list[str]:
    """The event domains the document's channels are about (``ingress.{domain}.{event}``, ``log.…``)."""
    return sorted({key.split(".")[1] for key in document.get("channels") or {}
                   if key.startswith(("ingress.", "log.", "live.")) and key.count(".") >= 2})


def _schemas_used(document: Mapping[str, Any], channels: Mapping[str, Any]) -> set[str]:
    """The schemas the ``channels``' messages refer to, and those these refer to in turn."""
    def refs(node: Any) -> set[str]:
        return set(_JSON_REF.findall(json.dumps(node)))

    schemas = (document.get("components") or {}).get("schemas") or {}
    messages = [_resolve(document, m["$ref"]) if "$ref" in m else m
                for channel in channels.values() for m in (channel.get("messages") or {}).values()]
    found, todo = set(), refs(messages)
    while todo:
        name = todo.pop()
        if name not in found and name in schemas:
            found.add(name)
            todo |= refs(schemas[name])
    return found


def render(document: Mapping[str, Any], *, interactive: str | None = None, domain: str | None = None,
           page: str = "/docs/asyncapi") -> str:
    """The page for ``document`` (AsyncAPI 3); ``interactive``: where the scripted view is;
    ``domain``: one domain's subjects only (offering its events, its part of the log, the verdicts)
    with the schemas they use, for a partner who works with one (the whole page is long); ``page``:
    where this page is served, for the links between the domains' pages."""
    info = document.get("info") or {}
    title = f"{info.get('title', 'AsyncAPI')} {info.get('version', '')}".strip()
    actions = {}
    for operation in (document.get("operations") or {}).values():
        channel = str((operation.get("channel") or {}).get("$ref", "")).rpartition("/")[2]
        actions[channel] = str(operation.get("action", ""))
    channels = document.get("channels") or {}
    if domain is not None:
        channels = {key: channel for key, channel in channels.items()
                    if key.startswith(("ingress.", "log.", "live.")) and key.split(".")[1] == domain
                    or key == "ingress-reply" and any(k.startswith(f"ingress.{domain}.") for k in channels)}
        title = f"{title} · {domain}"
    groups: dict[str, list[str]] = {"Offering events (request/reply)": [], "Following the log (live)": [],
                                    "The log (the bus's own subjects)": [], "Other subjects": []}
    kinds = {"ingress": "Offering events (request/reply)", "live": "Following the log (live)", "log": "The log (the bus's own subjects)"}
    for key in sorted(channels):
        groups[kinds.get(key.partition(".")[0], "Other subjects")].append(key)
    nav = ['<a href="/asyncapi.json">the document (JSON)</a>', '<a href="#schemas">schemas</a>']
    if interactive:
        nav.append(f'<a href="{html.escape(interactive)}">interactive view</a> (loads its script from a CDN)')
    by_domain = [f'<a href="{html.escape(page)}">every domain</a>' if domain is not None else "<b>every domain</b>"]
    by_domain += [f"<b>{html.escape(name)}</b>" if name == domain else f'<a href="{html.escape(page)}?domain={html.escape(name)}">{html.escape(name)}</a>'
                  for name in domains(document)]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>AsyncAPI {html.escape(str(document.get('asyncapi', '')))} · "
            f"content type <code>{html.escape(str(document.get('defaultContentType', '')))}</code></p>",
            f"<nav>{''.join(nav)}</nav>", f"<nav>One domain: {' · '.join(by_domain)}</nav>",
            f"<p>{_text(info.get('description'))}</p>", "<h2>Servers</h2>"]
    for name, server in (document.get("servers") or {}).items():
        body.append(f"<h3>{html.escape(name)}: <code>{html.escape(str(server.get('protocol', '')))}://"
                    f"{html.escape(str(server.get('host', '')))}</code></h3><p>{_text(server.get('description'))}</p>")
    for heading, keys in groups.items():
        if keys:
            body.append(f"<h2>{html.escape(heading)}</h2>")
            body.extend(_channel(document, key, channels[key], actions) for key in keys)
    # Each schema is shown when it is the page's target (a payload's link, a ``$ref`` in another
    # schema, or its own name here), the others folded: without a script, a link to a folded
    # <details> would land on it closed.
    body.append('<h2 id="schemas">Schemas</h2>')
    schemas = (document.get("components") or {}).get("schemas") or {}
    shown = set(schemas) if domain is None else _schemas_used(document, channels)
    for name, schema in sorted(schemas.items()):
        if name not in shown:
            continue
        anchor = html.escape(name)
        body.append(f'<section class="schema" id="schema-{anchor}"><h3><a href="#schema-{anchor}"><code>{anchor}</code></a>'
                    f"</h3><pre>{_json(schema)}</pre></section>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{html.escape(title)} — AsyncAPI</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")
