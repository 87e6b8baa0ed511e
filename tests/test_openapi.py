"""The OpenAPI document: valid 3.1, and naming every route the app registers."""

import re

from openapi_spec_validator import validate

from prerec.app import create_app
from prerec.config import Settings


async def test_spec_is_valid_openapi_31(client) -> None:
    response = await client.get("/openapi/openapi.json")
    assert response.status == 200
    spec = await response.json()
    assert spec["openapi"].startswith("3.1")
    validate(spec)


async def test_spec_names_every_route_and_method(client) -> None:
    spec = await (await client.get("/openapi/openapi.json")).json()
    app = create_app(Settings.from_env({}), "postgresql://unused")
    registered = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "*":
            registered.add((path, route.method.lower()))
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert registered == described


async def test_every_operation_documents_its_errors_as_problems(client) -> None:
    spec = await (await client.get("/openapi/openapi.json")).json()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and method != "head":  # HEAD has no body
                    assert "application/problem+json" in response["content"], (path, method, status)


async def test_reference_page_loads_scalar_with_the_spec(client) -> None:
    response = await client.get("/openapi")
    assert response.status == 200 and response.content_type == "text/html"
    page = await response.text()
    assert 'data-url="/openapi/openapi.json"' in page
    assert re.search(r'<script src="https://[^"]+@scalar/api-reference"', page)
