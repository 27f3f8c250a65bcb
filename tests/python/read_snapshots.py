"""Reads stac-sync's GeoParquet snapshot files with DuckDB, as a user would.

Usage: read_snapshots.py FOLDER. Prints one JSON object: for each file
`{collection}/items/{window}.parquet` under FOLDER, the ids of its rows in file order, and
per collection the ids, datetimes and bbox minima that one `read_parquet` over the
collection's files returns.
"""

import glob
import json
import os
import sys

import duckdb

folder = sys.argv[1]
out = {"files": {}, "collections": {}}
for path in sorted(glob.glob(os.path.join(folder, "*", "items", "*.parquet"))):
    rows = duckdb.sql(f"SELECT id FROM read_parquet('{path}')").fetchall()
    out["files"][os.path.relpath(path, folder)] = [r[0] for r in rows]
for collection in sorted(os.listdir(folder)):
    files = os.path.join(folder, collection, "items", "*.parquet")
    if not glob.glob(files):
        continue
    rows = duckdb.sql(
        f"SELECT id, strftime(datetime, '%Y-%m-%dT%H:%M:%SZ'), bbox.xmin "
        f"FROM read_parquet('{files}') ORDER BY id"
    ).fetchall()
    out["collections"][collection] = [[r[0], r[1], r[2]] for r in rows]
print(json.dumps(out))
