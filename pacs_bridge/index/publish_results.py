"""What a publishing attempt leaves on its study's row: the rule each of the four results writes (the results
themselves: ``pacs_bridge/study_queue.py``).

The publisher hands a batch of them to ``Index.record_publish_results``, which locks the batch's rows and
applies them in one transaction; ``Index.mark_published`` and its siblings apply one. Every result also gives
the study's claim back (``claimed_until``, ``claimed_by``).
"""

from __future__ import annotations

from pacs_bridge.index.models import PublishState, Study
from pacs_bridge.study_queue import Published, PublishResult, Refused, RetryLater


def apply_publish_result(study: Study, result: PublishResult) -> None:
    """Write ``result`` on ``study``'s row (locked by the caller) and give its claim back."""
    study.claimed_until = None
    study.claimed_by = None
    if isinstance(result, Published):
        study.published_hash = result.content_hash
        study.published_seq = result.change_seq
        if result.sent:
            study.published_at = result.at
            study.published_version = result.version_id
        study.attempts = 0
        study.next_attempt_at = None
        study.last_error = None
        if study.change_seq == result.change_seq:
            study.publish_state = PublishState.PUBLISHED.value
            study.due_at = None
            study.first_change_at = None
    elif isinstance(result, RetryLater):
        study.attempts += 1
        study.last_error = result.error
        study.next_attempt_at = result.next_attempt_at
        study.retry_not_before = result.not_before
    elif isinstance(result, Refused):
        study.attempts += 1
        study.last_error = result.error
        study.next_attempt_at = None
        if study.change_seq == result.change_seq:
            study.publish_state = PublishState.FAILED.value
            study.due_at = None
