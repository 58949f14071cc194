#!/usr/bin/env python3
"""Check relative links (and #anchors) in README.md and docs/*.md, and that path-like code
spans name files or directories that exist. Run from the repository root."""
import glob, os, re, sys

def slug(h):
    h = re.sub(r'<[^>]+>', '', h).strip().lower()
    h = re.sub(r'[^\w\- ]', '', h)          # GitHub drops punctuation but keeps _ and -
    return h.replace(' ', '-')

def anchors(path):
    text = open(path).read()
    text = re.sub(r'```.*?```', '', text, flags=re.S)
    out, seen = set(), {}
    for m in re.finditer(r'^#{1,6}\s+(.*)$', text, re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0); seen[s] = n + 1
        out.add(s if n == 0 else f'{s}-{n}')
    out |= set(re.findall(r'<a id="([^"]+)"', text))
    return out

files = ['README.md'] + sorted(glob.glob('docs/*.md'))
bad = checked = 0
for f in files:
    text = open(f).read()
    body = re.sub(r'```.*?```', '', text, flags=re.S)
    for m in re.finditer(r'\]\(([^)\s]+)\)', body):
        target = m.group(1)
        if re.match(r'[a-z]+:', target):
            continue
        checked += 1
        path, _, frag = target.partition('#')
        dest = os.path.normpath(os.path.join(os.path.dirname(f), path)) if path else f
        if not os.path.exists(dest):
            print(f'{f}: missing file {target}'); bad += 1; continue
        if frag and dest.endswith('.md') and frag not in anchors(dest):
            print(f'{f}: missing anchor {target}'); bad += 1
    # path-like code spans: compiler/..., runtime/..., examples/..., models/..., shaders/...
    for m in re.finditer(r'`([A-Za-z0-9_./\-]+)`', body):
        p = m.group(1)
        # Paths inside another repository ("github `owner/repo`, `models/x.py`") are not ours.
        if 'github' in body[max(0, m.start() - 120):m.start()]:
            continue
        if re.match(r'(compiler|runtime|examples|models|shaders|fuzz|docs|\.ci)/', p) and '{' not in p and '<' not in p:
            checked += 1
            if not os.path.exists(p.rstrip('/')):
                print(f'{f}: code span names a missing path {p}'); bad += 1
print(f'{checked} links and paths checked in {len(files)} files, {bad} bad')
sys.exit(1 if bad else 0)
