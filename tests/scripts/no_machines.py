# No machines: the driver's own globals still work.
import datetime

with subtest("arithmetic"):
    t.assertEqual(6 * 7, 42)
retry(lambda last_try: True, timeout=datetime.timedelta(seconds=5))
log.info("no machines here")
assert machines == [] and vlans == []
