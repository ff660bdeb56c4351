"""Broken: refuses with an empty reason (written as raw JSON: the contract's model forbids it)."""

import json

from toy import ToyVnfm, run

from schemas.topics import VNFM_REPLIES


class RefusesWithoutReason(ToyVnfm):
    async def refuse(self, notice):  # type: ignore[no-untyped-def]
        body = {
            "event_type": "BusinessMoveRefused",
            "schema_version": 1,
            **json.loads(json.dumps(self.envelope(notice), default=str)),
            "notice_id": notice.notice_id,
            "vnfm_id": self.vnfm_id,
            "reason": "",
        }
        producer = self.publisher._producer
        settings = self.publisher.settings
        await producer.send_and_wait(
            settings.topic(VNFM_REPLIES.name), value=json.dumps(body).encode(), key=b"x"
        )


if __name__ == "__main__":
    run(RefusesWithoutReason)
