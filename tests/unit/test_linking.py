"""The pure linking rules (issue 15 item 3): a literal reference is never downgraded, and a study still waiting
for its Patient or ServiceRequest is looked up less and less often, at least daily."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pacs_bridge.publish.linking import (
    MAX_RELINK_DELAY,
    Lookup,
    kept_link,
    links_after_publish,
    links_after_relink,
    relink_delay,
    search_key,
)
from pacs_bridge.records import Link, StudyLinks

SEARCH = "urn:oid:1.2.3|PAT-1"
KEY = search_key(SEARCH)
OTHER_KEY = search_key("urn:oid:1.2.3|PAT-2")
NOW = datetime(2024, 3, 15, 9, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
INTERVAL = timedelta(seconds=900)
OLD = Link(key=KEY, reference="Patient/old")
NEW = Link(key=KEY, reference="Patient/new")
NO_MATCH = Lookup(search=SEARCH, reason="no_match")


def test_the_search_key_is_a_digest_not_the_identifier() -> None:
    """The index keeps a digest of system|value: equal searches give equal keys, and no PatientID is stored again."""
    assert search_key(SEARCH) == KEY
    assert KEY != OTHER_KEY
    assert KEY is not None and len(KEY) == 64 and "PAT-1" not in KEY
    assert search_key(None) is None


@pytest.mark.parametrize(
    ("found", "published", "expected"),
    [
        # a match is sent
        (Lookup(search=SEARCH, reference="Patient/new"), None, NEW),
        # nothing found, never published: by identifier, waiting for the relink pass
        (NO_MATCH, None, Link(key=KEY)),
        # nothing found now, but published with a reference for this identifier: kept (never downgraded)
        (NO_MATCH, OLD, OLD),
        (Lookup(search=SEARCH, reason="several_matches"), OLD, OLD),
        # exactly one other match now: that one (an upgrade to the server's current answer, not a downgrade)
        (Lookup(search=SEARCH, reference="Patient/new"), OLD, NEW),
        # the reference was published for another identifier (a corrected PatientID): not this identifier's
        (NO_MATCH, Link(key=OTHER_KEY, reference="Patient/old"), Link(key=KEY)),
        # the identifier is no longer searchable (its issuer no longer mapped): never linked, whatever was sent
        (Lookup(search=None, reason="issuer_not_mapped", issuer="HOSP-C"), OLD, Link()),
        # identifier mode (nothing asked): nothing to link or wait for
        (Lookup(search=None), None, Link()),
    ],
)  # fmt: skip
def test_a_literal_reference_is_never_downgraded_for_its_identifier(
    found: Lookup, published: Link | None, expected: Link
) -> None:
    assert kept_link(found, published) == expected


@pytest.mark.parametrize(
    ("attempts", "interval", "expected"),
    [
        (0, INTERVAL, INTERVAL),  # publish.relink_seconds after the publish
        (1, INTERVAL, 2 * INTERVAL),  # then twice as long after each lookup that found nothing
        (2, INTERVAL, 4 * INTERVAL),
        (6, INTERVAL, 64 * INTERVAL),  # 16 h
        (7, INTERVAL, MAX_RELINK_DELAY),  # 32 h would be more than a day: daily from then on
        (500, INTERVAL, MAX_RELINK_DELAY),  # however many lookups (no overflow)
        (0, MINUTE, MINUTE),
        (11, MINUTE, MAX_RELINK_DELAY),  # 2048 min > 1440 min
        (0, MAX_RELINK_DELAY, MAX_RELINK_DELAY),  # the largest interval check-config allows: daily throughout
        (3, MAX_RELINK_DELAY, MAX_RELINK_DELAY),
    ],
)
def test_a_study_that_keeps_not_matching_is_looked_up_less_often_but_at_least_daily(
    attempts: int, interval: timedelta, expected: timedelta
) -> None:
    assert relink_delay(attempts, interval) == expected


WAITING = Link(key=KEY)
LINKED = Link(key=KEY, reference="Patient/p1")
ORDER_WAITING = Link(key=OTHER_KEY)
ORDER_LINKED = Link(key=OTHER_KEY, reference="ServiceRequest/s1")
SCHEDULED = StudyLinks(patient=WAITING, relink_at=NOW - MINUTE, relink_attempts=3)
LATER = NOW + INTERVAL
BACKED_OFF = StudyLinks(patient=WAITING, relink_at=NOW + 16 * INTERVAL, relink_attempts=4)


@pytest.mark.parametrize(
    ("published", "patient", "order", "interval", "expected"),
    [
        # everything linked, or nothing searchable: no schedule
        (None, LINKED, ORDER_LINKED, INTERVAL, StudyLinks(patient=LINKED, order=ORDER_LINKED)),
        (None, Link(), Link(), INTERVAL, StudyLinks()),
        # a link waits: looked up relink_seconds later
        (None, WAITING, Link(), INTERVAL, StudyLinks(patient=WAITING, relink_at=LATER)),
        (None, LINKED, ORDER_WAITING, INTERVAL, StudyLinks(patient=LINKED, order=ORDER_WAITING, relink_at=LATER)),
        # the same identifier already waited: its schedule and backoff go on (a new instance restarts nothing)
        (SCHEDULED, WAITING, Link(), INTERVAL, SCHEDULED),
        # another identifier waits now (a corrected PatientID; another key): a fresh schedule
        (SCHEDULED, ORDER_WAITING, Link(), INTERVAL, StudyLinks(patient=ORDER_WAITING, relink_at=LATER)),
        # it was linked meanwhile: nothing waits
        (SCHEDULED, LINKED, Link(), INTERVAL, StudyLinks(patient=LINKED)),
        # relinking off (0): waiting from now, for when it is turned on
        (None, WAITING, Link(), timedelta(0), StudyLinks(patient=WAITING, relink_at=NOW)),
    ],
)  # fmt: skip
def test_links_recorded_after_a_publish(
    published: StudyLinks | None, patient: Link, order: Link, interval: timedelta, expected: StudyLinks
) -> None:
    assert links_after_publish(published, patient, order, now=NOW, interval=interval) == expected


@pytest.mark.parametrize(
    ("published", "patient", "order", "expected", "republish"),
    [
        # the Patient was found: republished; nothing waits any more
        (SCHEDULED, LINKED, Link(), StudyLinks(patient=LINKED), True),
        # found the Patient, the order still waits: republished, the order looked up relink_seconds later
        (
            StudyLinks(patient=WAITING, order=ORDER_WAITING, relink_at=NOW, relink_attempts=5),
            LINKED,
            ORDER_WAITING,
            StudyLinks(patient=LINKED, order=ORDER_WAITING, relink_at=NOW + INTERVAL),
            True,
        ),
        # found nothing new: one more attempt, the delay doubled (3 before -> 4 now: 16 intervals)
        (SCHEDULED, WAITING, Link(), BACKED_OFF, False),
        # the order was linked before and only the patient waited: finding nothing republishes nothing
        (
            StudyLinks(patient=WAITING, order=ORDER_LINKED, relink_at=NOW, relink_attempts=0),
            WAITING,
            ORDER_LINKED,
            StudyLinks(patient=WAITING, order=ORDER_LINKED, relink_at=NOW + 2 * INTERVAL, relink_attempts=1),
            False,
        ),
        # the identifier is no longer searchable (issuer unmapped since): nothing to look for, nothing to send
        (SCHEDULED, Link(), Link(), StudyLinks(), False),
    ],
)  # fmt: skip
def test_links_recorded_after_a_relink_lookup(
    published: StudyLinks, patient: Link, order: Link, expected: StudyLinks, republish: bool
) -> None:
    assert links_after_relink(published, patient, order, now=NOW, interval=INTERVAL) == (expected, republish)
