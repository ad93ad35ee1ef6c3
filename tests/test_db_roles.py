"""The services' PostgreSQL role may read and append history, and nothing else."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

pytestmark = pytest.mark.stack


def test_app_role_is_least_privilege(stack):
    _, settings = stack
    db = settings.database

    async def go():
        conn = await asyncpg.connect(host=db.host, port=db.port, user=db.app_user,
                                     password=db.app_password.get_secret_value(), database=db.name)
        try:
            await conn.execute("INSERT INTO model_profiles (model, device, batch_size, tokens_per_step, step_ms, samples)"
                               " VALUES ('probe', 'cpu', 1, 1, 1.0, 1)")
            assert await conn.fetchval("SELECT count(*) FROM model_profiles WHERE model = 'probe'") >= 1
            for forbidden in ("DELETE FROM model_profiles", "UPDATE decisions SET chain = 'x'", "DROP TABLE decisions",
                              "CREATE TABLE intruder (id int)", "TRUNCATE pair_stats"):
                with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                    await conn.execute(forbidden)
        finally:
            await conn.close()

    asyncio.run(go())
