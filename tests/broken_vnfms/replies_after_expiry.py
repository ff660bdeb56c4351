"""Broken: ignores NoticeExpired and replies once its work is done."""

from toy import ToyVnfm, run


class RepliesAfterExpiry(ToyVnfm):
    async def on_expired(self, notice_id: str) -> None:
        return None


if __name__ == "__main__":
    run(RepliesAfterExpiry)
