"""Clients generated from the served OpenAPI document with the stacks this API's users take:
openapi-typescript + openapi-fetch (the original's web UIs) and openapi-python-client.

Each generated client lists, uploads and downloads against a real server. The generators and
libraries are installed now, from npm and PyPI: nothing generated is kept in the repository.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import io
import json
import shutil
import sys
import typing
import uuid
from pathlib import Path

import pytest

from tests import contract
from tests.conftest import EVENT, ogg

NPM = shutil.which("npm")
NODE = shutil.which("node")
# The majors the original's web UIs use; a new major is a change to try, not to take blindly.
NPM_PACKAGES = ("openapi-typescript@7", "openapi-fetch@0.17", "typescript@5")
AUDIO = ogg(3000, b"\x01\x02\x03")

# The documented openapi-typescript recipe for binary bodies: `format: binary` becomes Blob.
GENERATE_TS = """
import fs from "node:fs";
import ts from "typescript";
import openapiTS, { astToString } from "openapi-typescript";

const BLOB = ts.factory.createTypeReferenceNode(ts.factory.createIdentifier("Blob"));
const ast = await openapiTS(new URL(process.argv[2]), {
  transform(schema) {
    if (schema.format === "binary") return BLOB;
  },
});
fs.writeFileSync("api.d.ts", astToString(ast));
"""

CLIENT_TS = """
import createClient from "openapi-fetch";
import type { components, paths } from "./api.js";

type Prerecording = components["schemas"]["Prerecording"];
type PrerecordingList = components["schemas"]["PrerecordingList"];

const [baseUrl, event, audioHex] = process.argv.slice(2);
const client = createClient<paths>({ baseUrl });
const audio = new Blob([Buffer.from(audioHex, "hex")], { type: "audio/ogg" });

const upload = await client.PUT("/prerecordings/{event}/{start}", {
  params: { path: { event, start: "2024-01-01T00:00" } },
  body: audio,
  bodySerializer: (body: Blob) => body,
  headers: { "Content-Type": "audio/ogg" },
});
const created: Prerecording | undefined = upload.data;
if (upload.response.status !== 201 || created === undefined) throw new Error(`upload: ${upload.response.status}`);

const listing = await client.GET("/prerecordings/{event}", {
  params: { path: { event }, query: { limit: 10, offset: 0, order: "desc" } },
});
const page: PrerecordingList | undefined = listing.data;
if (page === undefined) throw new Error(`list: ${listing.response.status}`);

const download = await client.GET("/prerecordings/{event}/{start}", {
  params: { path: { event, start: created.start } },
  parseAs: "arrayBuffer",
});
if (download.data === undefined) throw new Error(`download: ${download.response.status}`);

console.log(JSON.stringify({ created, page, downloaded: Buffer.from(download.data).toString("hex") }));

// Never called: tsc fails if these compile, i.e. if the query were typed as loose strings.
export function typedQuery(): void {
  // @ts-expect-error limit is a number
  void client.GET("/prerecordings/{event}", { params: { path: { event }, query: { limit: "10" } } });
  // @ts-expect-error offset is a number
  void client.GET("/prerecordings/{event}", { params: { path: { event }, query: { offset: "0" } } });
  // @ts-expect-error order is "asc" | "desc"
  void client.GET("/prerecordings/{event}", { params: { path: { event }, query: { order: '"desc"' } } });
}
"""

TSCONFIG = {
    "compilerOptions": {
        "strict": True,
        "target": "es2022",
        "module": "nodenext",
        "moduleResolution": "nodenext",
        "lib": ["es2022", "dom"],
        "types": ["node"],
        "skipLibCheck": True,
        "outDir": "out",
    },
    "files": ["client.ts"],
}


async def run(*command: str, cwd: Path, timeout: float = 300) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output = (await asyncio.wait_for(process.communicate(), timeout))[0].decode()
    assert process.returncode == 0, f"{' '.join(command)} exited with {process.returncode}:\n{output[-4000:]}"
    return output


@pytest.fixture
async def server(aiohttp_server, app):  # type: ignore[no-untyped-def]
    return await aiohttp_server(app)


@pytest.mark.skipif(NPM is None or NODE is None, reason="needs node and npm (.ci/run installs them)")
async def test_typescript_client_lists_uploads_and_downloads(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "package.json").write_text(json.dumps({"type": "module", "private": True}))
    await run(NPM, "install", "--no-audit", "--no-fund", "--silent", *NPM_PACKAGES, "@types/node@20", cwd=tmp_path)
    (tmp_path / "generate.mjs").write_text(GENERATE_TS)
    await run(NODE, "generate.mjs", str(server.make_url("/openapi/openapi.json")), cwd=tmp_path)
    api = (tmp_path / "api.d.ts").read_text()
    assert "limit?: number;" in api and 'Order: "asc" | "desc";' in api, api
    assert '"/uploads/{id}": {' in api and "appendToUpload:" in api, api
    (tmp_path / "client.ts").write_text(CLIENT_TS)
    (tmp_path / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    await run(str(tmp_path / "node_modules" / ".bin" / "tsc"), "-p", ".", cwd=tmp_path)

    output = await run(NODE, "out/client.js", str(server.make_url("")), EVENT, AUDIO.hex(), cwd=tmp_path)
    result = json.loads(output.strip().splitlines()[-1])
    contract.check("Prerecording", result["created"])
    contract.check("PrerecordingList", result["page"])
    assert result["page"]["prerecordings"] == [result["created"]]
    assert bytes.fromhex(result["downloaded"]) == AUDIO


PYTHON_CLIENT_CONFIG = """\
# audio/ogg, tus's application/offset+octet-stream and the IETF draft's application/partial-upload
# are content types the generator does not know; its documented switch treats them as bytes.
content_type_overrides:
  audio/ogg: application/octet-stream
  application/offset+octet-stream: application/octet-stream
  application/partial-upload: application/octet-stream
package_name_override: prerec_client
post_hooks: []
"""


@pytest.fixture
def generated_package(tmp_path: Path):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(tmp_path))
    yield tmp_path / "prerec_client"
    sys.path.remove(str(tmp_path))
    for name in [name for name in sys.modules if name.split(".")[0] == "prerec_client"]:
        del sys.modules[name]


async def test_python_client_lists_uploads_and_downloads(server, tmp_path: Path, generated_package: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "config.yaml").write_text(PYTHON_CLIENT_CONFIG)
    generator = Path(sys.executable).parent / "openapi-python-client"
    output = await run(
        *(str(generator), "generate", "--url", str(server.make_url("/openapi/openapi.json"))),
        *("--config", "config.yaml", "--meta", "none", "--output-path", str(generated_package)),
        cwd=tmp_path,
    )
    assert "warning" not in output.lower(), output  # a skipped endpoint is only a warning to the generator

    client_module = importlib.import_module("prerec_client")
    api = importlib.import_module("prerec_client.api.default")
    models = importlib.import_module("prerec_client.models")
    types = importlib.import_module("prerec_client.types")
    list_prerecordings = importlib.import_module(f"{api.__name__}.list_prerecordings")
    upload_prerecording = importlib.import_module(f"{api.__name__}.upload_prerecording")
    download_prerecording = importlib.import_module(f"{api.__name__}.download_prerecording")
    list_uploads = importlib.import_module(f"{api.__name__}.list_uploads")
    # The tus operations are generated too (the generator skips, with a warning, what it cannot type).
    for operation in ("upload_options", "create_upload", "get_upload_offset", "append_to_upload", "cancel_upload"):
        importlib.import_module(f"{api.__name__}.{operation}")

    # Models named after the document's components, none after an operation or a status.
    assert set(models.__all__) == {
        "CarefulCreation",
        "CreateOnly",
        "EventType",
        "Expectation",
        "InteropVersion",
        "OpenAPIDocument",
        "Order",
        "Prerecording",
        "PrerecordingCreatedEvent",
        "PrerecordingData",
        "PrerecordingDeletedEvent",
        "PrerecordingKey",
        "PrerecordingKeyData",
        "PrerecordingList",
        "PrerecordingUpdatedEvent",
        "Problem",
        "Readiness",
        "TusVersion",
        "UploadCancelledEvent",
        "UploadData",
        "UploadExpiredEvent",
        "UploadInProgress",
        "UploadList",
        "UploadProgress",
        "UploadProgressEvent",
        "UploadComplete",
    }
    hints = typing.get_type_hints(list_prerecordings.sync)
    assert int in typing.get_args(hints["limit"]) and int in typing.get_args(hints["offset"])
    assert [order.value for order in models.Order] == ["asc", "desc"]

    # The synchronous functions (the async ones cannot send a file body: httpx's AsyncClient
    # refuses the BinaryIO the generated code passes on), in a thread while the server serves.
    def lists_uploads_and_downloads() -> None:
        event = uuid.UUID(EVENT)
        with client_module.Client(base_url=str(server.make_url(""))) as client:
            created = upload_prerecording.sync(
                event, "2024-01-01T00:00", client=client, body=types.File(payload=io.BytesIO(AUDIO))
            )
            assert isinstance(created, models.Prerecording), created
            assert (created.start, created.size) == ("2024-01-01T00:00:00", len(AUDIO))
            assert created.etag == f'"{hashlib.sha256(AUDIO).hexdigest()}"' and created.modified.tzinfo is not None
            page = list_prerecordings.sync(event, client=client, limit=10, offset=0, order=models.Order.DESC)
            assert isinstance(page, models.PrerecordingList), page
            assert page.count == 1 and [item.to_dict() for item in page.prerecordings] == [created.to_dict()]
            audio = download_prerecording.sync(event, created.start, client=client)
            assert isinstance(audio, types.File), audio
            assert audio.payload.read() == AUDIO
            uploads = list_uploads.sync(client=client, event=event)
            assert isinstance(uploads, models.UploadList) and uploads.uploads == [], uploads

    await asyncio.to_thread(lists_uploads_and_downloads)
