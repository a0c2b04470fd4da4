"""Building and reading Envoy ext_proc messages: header mutations, `envoy.lb` metadata, bodies.

Owns the wire vocabulary of the endpoint-picker protocol (header and metadata names) and every
`ProcessingResponse` shape the picker sends, so the stream state machine never touches protobuf
field names directly.

- The destination goes in header `x-gateway-destination-endpoint` (set with
  OVERWRITE_IF_EXISTS_OR_ADD, so a client-sent value is replaced) and in dynamic metadata
  `envoy.lb` / `x-gateway-destination-endpoint`, always the same string.
- Client-sent routing headers the picker did not set (`x-prefiller-host-port` on a request
  that gets no remote prefill, the served-endpoint header) are removed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HttpHeaders,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    StreamedBodyResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

DESTINATION_HEADER = "x-gateway-destination-endpoint"
PREFILLER_HEADER = "x-prefiller-host-port"
SERVED_KEY = "x-gateway-destination-endpoint-served"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
#: Headers a client may not set: the picker owns them.
ROUTING_HEADERS = (DESTINATION_HEADER, PREFILLER_HEADER, SERVED_KEY)

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_map(headers: HttpHeaders) -> dict[str, str]:
    """Envoy's header list as a dict with lower-case names (Envoy sends `raw_value` bytes).

    A repeated header keeps its values joined by "," as HTTP allows.
    """
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        prev = out.get(key)
        out[key] = value if prev is None else f"{prev},{value}"
    return out


def routing_mutation(
    destination: str | None, prefiller: str | None, extra: Mapping[str, str] | None = None
) -> HeaderMutation:
    """Set the destination (and prefiller) headers; remove the routing headers not set."""
    mutation = HeaderMutation()
    owned = {DESTINATION_HEADER: destination, PREFILLER_HEADER: prefiller}
    for name, value in owned.items():
        if value is not None:
            mutation.set_headers.append(_set(name, value))
    for name, value in (extra or {}).items():
        mutation.set_headers.append(_set(name, value))
    mutation.remove_headers.extend(n for n in ROUTING_HEADERS if owned.get(n) is None)
    return mutation


def _set(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()), append_action=_OVERWRITE
    )


def destination_metadata(destination: str) -> Struct:
    """`envoy.lb` dynamic metadata carrying the destination (the header's exact value)."""
    md = Struct()
    md.get_or_create_struct(LB_NAMESPACE)[DESTINATION_HEADER] = destination
    return md


def headers_response(
    mutation: HeaderMutation | None = None,
    clear_route_cache: bool = False,
    metadata: Struct | None = None,
) -> ProcessingResponse:
    common = CommonResponse(header_mutation=mutation, clear_route_cache=clear_route_cache)
    return ProcessingResponse(
        request_headers=HeadersResponse(response=common), dynamic_metadata=metadata
    )


def request_body_response(
    mutation: HeaderMutation | None = None,
    clear_route_cache: bool = False,
    metadata: Struct | None = None,
    streamed: tuple[bytes, bool] | None = None,
    replace: bytes | None = None,
) -> ProcessingResponse:
    """Answer to a `request_body`: pass-through, optionally with the routing mutation, or (in
    full-duplex mode) the body handed back as one `streamed_response` (body, end_of_stream).

    `replace` (BUFFERED and STREAMED modes) puts these bytes in place of the chunk answered;
    b"" clears it."""
    body_mutation = None
    if streamed is not None:
        body_mutation = BodyMutation(
            streamed_response=StreamedBodyResponse(body=streamed[0], end_of_stream=streamed[1])
        )
    elif replace is not None:
        body_mutation = BodyMutation(body=replace) if replace else BodyMutation(clear_body=True)
    common = CommonResponse(
        header_mutation=mutation, clear_route_cache=clear_route_cache, body_mutation=body_mutation
    )
    return ProcessingResponse(request_body=BodyResponse(response=common), dynamic_metadata=metadata)


def request_trailers_response() -> ProcessingResponse:
    return ProcessingResponse(request_trailers=TrailersResponse())


def response_headers_response(remove: Iterable[str] = ()) -> ProcessingResponse:
    """Pass the response headers on, without the headers named in `remove`."""
    names = list(remove)
    if not names:
        return ProcessingResponse(response_headers=HeadersResponse())
    common = CommonResponse(header_mutation=HeaderMutation(remove_headers=names))
    return ProcessingResponse(response_headers=HeadersResponse(response=common))


def response_body_response(streamed: tuple[bytes, bool] | None = None) -> ProcessingResponse:
    """Pass a response chunk on: empty in STREAMED/BUFFERED mode, echoed in full-duplex mode."""
    if streamed is None:
        return ProcessingResponse(response_body=BodyResponse())
    mutation = BodyMutation(
        streamed_response=StreamedBodyResponse(body=streamed[0], end_of_stream=streamed[1])
    )
    return ProcessingResponse(
        response_body=BodyResponse(response=CommonResponse(body_mutation=mutation))
    )


def response_trailers_response() -> ProcessingResponse:
    return ProcessingResponse(response_trailers=TrailersResponse())


def immediate_response(
    status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
) -> ProcessingResponse:
    """Answer the client directly (errors); Envoy sends `body` with this HTTP `status`."""
    mutation = HeaderMutation(set_headers=[_set(k, v) for k, v in headers])
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=status), headers=mutation, body=body
        )
    )


def served_endpoint(request: ProcessingRequest) -> str | None:
    """The endpoint Envoy reports it actually used (protocol v1.0 `envoy.lb` metadata)."""
    ns = request.metadata_context.filter_metadata.get(LB_NAMESPACE)
    if ns is None or SERVED_KEY not in ns.fields:
        return None
    return ns.fields[SERVED_KEY].string_value or None


def subset_hint(request: ProcessingRequest) -> list[str] | None:
    """The candidate restriction `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-
    subset` (a list of ip:port, or one comma-separated string); None when absent."""
    ns = request.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
    if ns is None or SUBSET_KEY not in ns.fields:
        return None
    value = ns.fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return [v.string_value for v in value.list_value.values if v.string_value]
    if kind == "string_value":
        return [s.strip() for s in value.string_value.split(",") if s.strip()]
    return []
