"""GET/HEAD /ping: liveness only."""


async def test_ping_answers_204_to_get_and_head(client) -> None:
    for method in ("GET", "HEAD"):
        response = await client.request(method, "/ping")
        assert response.status == 204
        assert await response.read() == b""
