"""A reader process that leases one export and holds it until killed.

Usage:
  python tests/children/lease_child.py EXPORT_DIR LEASE_SECONDS

Prints `HELD` (flushed) once it holds the lease, or `GONE` if the export was
not there to lease, then holds it (renewing it) until killed.
"""

import os
import sys
import time

# The checkout and tests/, for when this runs as a script.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

from ckpt_export import leases  # pylint: disable=g-import-not-at-top


def main() -> None:
  export_dir, lease_seconds = sys.argv[1], float(sys.argv[2])
  lease = leases.acquire(export_dir, lease_seconds, holder='lease_child')
  print('GONE' if lease is None else 'HELD', flush=True)
  while True:
    time.sleep(3600)


if __name__ == '__main__':
  main()
