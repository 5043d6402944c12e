import {
  Stats, cpuPercent, deathText, deathWorthADialog, diffCounts, diffRows, digestMismatch, formatBytes, formatCpus,
  formatPercent, limitLevel, meterParts, pinnedReference, progressFraction, shortDigest, validateTag, worstLevel
} from '../src/format';

const MiB = 1024 * 1024;

function stats(memory: number, memLimit: number | null, pids = 4, pidsLimit: number | null = 512): Stats {
  return {
    memory: { current: memory, peak: null, limit: memLimit },
    cpu: { usage_ns: 0, percent: null, limit: null },
    pids: { current: pids, limit: pidsLimit },
    time: 100
  };
}

describe('formatBytes', () => {
  it.each([
    [0, '0 B'], [512, '512 B'], [1536, '1.5 KiB'], [512 * MiB, '512 MiB'], [2048 * MiB, '2 GiB'],
    [1.25 * 1024 * MiB, '1.3 GiB'], [10.4 * MiB, '10 MiB']
  ])('%d bytes is %s', (n, text) => expect(formatBytes(n)).toBe(text));

  it('says ? for absent or nonsense values', () => {
    expect(formatBytes(null)).toBe('?');
    expect(formatBytes(-1)).toBe('?');
    expect(formatBytes(NaN)).toBe('?');
  });
});

describe('formatCpus and formatPercent', () => {
  it('names cores', () => {
    expect(formatCpus(1)).toBe('1 CPU');
    expect(formatCpus(0.5)).toBe('0.5 CPU');
    expect(formatCpus(2)).toBe('2 CPUs');
    expect(formatCpus(null)).toBe('');
  });
  it('keeps one decimal below 10%', () => {
    expect(formatPercent(3.24)).toBe('3.2%');
    expect(formatPercent(3)).toBe('3%');
    expect(formatPercent(45.6)).toBe('46%');
    expect(formatPercent(-2)).toBe('0%');
    expect(formatPercent(null)).toBe('?');
  });
});

describe('limitLevel', () => {
  it('is ok below 75%, warn from 75%, critical from 90%', () => {
    expect(limitLevel(74, 100)).toBe('ok');
    expect(limitLevel(75, 100)).toBe('warn');
    expect(limitLevel(89.9, 100)).toBe('warn');
    expect(limitLevel(90, 100)).toBe('critical');
    expect(limitLevel(120, 100)).toBe('critical');
  });
  it('is ok without a limit', () => {
    expect(limitLevel(1e12, null)).toBe('ok');
    expect(limitLevel(5, 0)).toBe('ok');
    expect(limitLevel(null, 100)).toBe('ok');
  });
  it('takes the worst of several', () => {
    expect(worstLevel('ok', 'warn', 'ok')).toBe('warn');
    expect(worstLevel('warn', 'critical')).toBe('critical');
    expect(worstLevel()).toBe('ok');
  });
});

describe('meterParts', () => {
  it('shows memory against its limit and colours it near the limit', () => {
    const parts = meterParts(stats(470 * MiB, 512 * MiB), 12);
    expect(parts.memory.text).toBe('Mem 470 MiB / 512 MiB');
    expect(parts.memory.level).toBe('critical');
    expect(parts.level).toBe('critical');
    expect(parts.pids.text).toBe('Procs 4 / 512');
    expect(parts.title).toContain('of 512 MiB');
  });
  it('shows no limit when there is none', () => {
    const parts = meterParts(stats(10 * MiB, null, 3, null), null);
    expect(parts.memory.text).toBe('Mem 10 MiB');
    expect(parts.pids.text).toBe('Procs 3');
    expect(parts.cpu.text).toBe('CPU –');
    expect(parts.level).toBe('ok');
  });
  it('measures CPU against the CPU limit in cores', () => {
    const s = stats(MiB, 512 * MiB);
    s.cpu.limit = 0.5;
    expect(meterParts(s, 48).cpu).toEqual({ text: 'CPU 48% / 0.5 CPU', level: 'critical' });
    expect(meterParts(s, 20).cpu.level).toBe('ok');
  });
  it('colours processes near the pids limit', () => {
    expect(meterParts(stats(MiB, null, 500, 512), 0).pids.level).toBe('critical');
  });
});

describe('cpuPercent', () => {
  it('uses the server percent when given', () => {
    const s = stats(0, null);
    s.cpu.percent = 33;
    expect(cpuPercent(null, s)).toBe(33);
  });
  it('computes from the usage counter between two samples', () => {
    const a = stats(0, null);
    const b = stats(0, null);
    a.cpu.usage_ns = 1e9;
    b.cpu.usage_ns = 2.5e9;
    b.time = a.time + 3;
    expect(cpuPercent(a, b)).toBeCloseTo(50);
  });
  it('is null without a previous sample or after a counter reset', () => {
    const a = stats(0, null);
    const b = stats(0, null);
    a.cpu.usage_ns = 5e9;
    b.time = a.time + 1;
    expect(cpuPercent(null, b)).toBeNull();
    expect(cpuPercent(a, b)).toBeNull();
  });
});

describe('validateTag', () => {
  it.each(['my-env:v1', 'my-env', 'localhost/x:1', '127.0.0.1:5000/team/env:2026-12', 'team/a__b.c-d/e', 'x:_tag', 'docker.io/library/debian:bookworm'])(
    'accepts %s', ref => expect(validateTag(ref)).toBeNull());

  it.each([
    ['', 'enter a name'],
    ['My-Env:v1', 'lowercase'],
    ['env:-bad', 'invalid tag'],
    ['env:.bad', 'invalid tag'],
    ['env:' + 'x'.repeat(129), 'invalid tag'],
    ['env@sha256:abc', 'no @'],
    [' env', 'no spaces'],
    ['a//b', 'empty path component'],
    ['env-:v1', 'invalid name component'],
    ['-env', 'invalid name component'],
    ['host:port/x', 'invalid registry port'],
    ['bad_host.com/x', 'invalid registry host'],
    ['env:v 1', 'invalid tag']
  ])('rejects %j (%s)', (ref, why) => expect(validateTag(ref)).toContain(why));
});

describe('diffRows', () => {
  const row = (path: string, bytes: number) => ({ path, added: 1, changed: 2, deleted: 3, bytes });
  it('sorts the largest folders first', () => {
    expect(diffRows([row('/a', 1), row('/b', 30), row('/c', 20)]).map(r => r.path)).toEqual(['/b', '/c', '/a']);
  });
  it('folds the rest into one row that adds up', () => {
    const rows = diffRows([row('/a', 5), row('/b', 4), row('/c', 3), row('/d', 2), row('/e', 1)], 3);
    expect(rows.map(r => r.path)).toEqual(['/a', '/b', '3 other folders']);
    expect(rows[2]).toMatchObject({ added: 3, changed: 6, deleted: 9, bytes: 6 });
  });
  it('counts as +added ~changed -deleted', () => expect(diffCounts(row('/x', 0))).toBe('+1 ~2 -3'));
});

describe('progress', () => {
  it('is a fraction of a known total, null when unknown, 1 when finished', () => {
    expect(progressFraction(5, 10)).toBe(0.5);
    expect(progressFraction(15, 10)).toBe(1);
    expect(progressFraction(5, null)).toBeNull();
    expect(progressFraction(5, 0)).toBeNull();
    expect(progressFraction(0, null, true)).toBe(1);
  });
  it('shortens digests', () => {
    expect(shortDigest('sha256:' + 'ab'.repeat(32))).toBe('sha256:abababababab');
    expect(shortDigest(null)).toBe('');
  });
});

describe('death', () => {
  const oom = { reason: 'killed: out of memory (limit 512 MiB, peak 511 MiB)', oom_killed: true, signal: 9, code: null,
    memory_limit: 512 * MiB, memory_peak: 511 * MiB };
  it('shows a dialog for OOM kills and signals, not for exits', () => {
    expect(deathWorthADialog(oom)).toBe(true);
    expect(deathWorthADialog({ ...oom, oom_killed: false, signal: 11 })).toBe(true);
    expect(deathWorthADialog({ ...oom, oom_killed: false, signal: null, code: 1 })).toBe(false);
    expect(deathWorthADialog(null)).toBe(false);
  });
  it('says out of memory with the limit', () => {
    const text = deathText(oom);
    expect(text.title).toBe('Kernel killed: out of memory');
    expect(text.body).toBe(oom.reason);
    expect(text.hint).toContain('(512 MiB)');
  });
  it('names the signal', () => {
    expect(deathText({ ...oom, oom_killed: false, signal: 11 }).title).toBe('Kernel killed by signal 11');
  });
});

describe('digest record', () => {
  const d1 = 'sha256:' + '1'.repeat(64);
  const d2 = 'sha256:' + '2'.repeat(64);
  it('is silent when nothing was recorded or the digest matches', () => {
    expect(digestMismatch(null, { name: 'x', digest: d1 })).toBeNull();
    expect(digestMismatch({}, { name: 'x', digest: d1 })).toBeNull();
    expect(digestMismatch({ image: 'x', digest: d1 }, { name: 'x', digest: d1 })).toBeNull();
  });
  it('names both digests when they differ', () => {
    const text = digestMismatch({ image: 'localhost/debian:bookworm', digest: d1 }, { name: 'localhost/debian:bookworm', digest: d2 });
    expect(text).toContain('sha256:111111111111');
    expect(text).toContain('sha256:222222222222');
  });
  it('pins name@digest, dropping the tag but not a registry port', () => {
    expect(pinnedReference('127.0.0.1:5000/env:v1', d1)).toBe(`127.0.0.1:5000/env@${d1}`);
    expect(pinnedReference('127.0.0.1:5000/env', d1)).toBe(`127.0.0.1:5000/env@${d1}`);
    expect(pinnedReference(`env@${d2}`, d1)).toBe(`env@${d1}`);
  });
});
