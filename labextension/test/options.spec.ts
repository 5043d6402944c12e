import {
  checkStartOptions, compactOptions, describeOptions, parseCpus, parseMemory, recordedStartOptions, repositoryOf,
  tagOf, tagsFor
} from '../src/options';

const MiB = 2 ** 20;
const open = { max_memory: null, max_cpus: null, networks: ['none', 'bridge', 'host'] };
const tight = { max_memory: 1024 * MiB, max_cpus: 2, networks: ['none', 'bridge'] };

describe('parseMemory and parseCpus (the server rules, binary units)', () => {
  it.each([
    ['512m', 512 * MiB], ['1g', 1024 * MiB], ['1.5GiB', 1536 * MiB], ['1048576', MiB], [' 64 MB ', 64 * MiB]
  ])('%s is %d bytes', (text, bytes) => expect(parseMemory(text)).toBe(bytes));

  it.each(['', 'lots', '-1g', '0', '1x', '1e9'])('refuses %p', text => expect(parseMemory(text)).toBeNull());

  it('takes cores of at least 0.01', () => {
    expect(parseCpus('0.5')).toBe(0.5);
    expect(parseCpus('2')).toBe(2);
    expect(parseCpus('0.001')).toBeNull();
    expect(parseCpus('-1')).toBeNull();
    expect(parseCpus('two')).toBeNull();
    expect(parseCpus('Infinity')).toBeNull();
  });
});

describe('checkStartOptions', () => {
  it('accepts values under the ceilings, and empty fields', () => {
    expect(checkStartOptions({ memory: '512m', cpus: '1.5', network: 'bridge', tag: 'v2' }, tight, ['v2'])).toEqual({});
    expect(checkStartOptions({}, tight)).toEqual({});
    expect(checkStartOptions({ memory: '', cpus: ' ' }, tight)).toEqual({});
  });

  it('says what is wrong, per field', () => {
    const errors = checkStartOptions({ memory: '2g', cpus: '4', network: 'host', tag: 'gone' }, tight, ['v2']);
    expect(errors.memory).toBe('at most 1024 MiB on this server');
    expect(errors.cpus).toBe('at most 2 on this server');
    expect(errors.network).toMatch(/not allowed here \(allowed: none, bridge\)/);
    expect(errors.tag).toMatch(/not in the image store/);
  });

  it('refuses unlimited memory only where the server has a ceiling', () => {
    expect(checkStartOptions({ memory: 'none' }, open)).toEqual({});
    expect(checkStartOptions({ memory: 'none' }, tight).memory).toMatch(/at most 1024 MiB/);
  });

  it('refuses malformed values and tags that could be paths', () => {
    expect(checkStartOptions({ memory: 'much' }, open).memory).toMatch(/512m/);
    expect(checkStartOptions({ cpus: '0' }, open).cpus).toMatch(/at least/);
    expect(checkStartOptions({ tag: '../etc' }, open).tag).toMatch(/letters, digits/);
    expect(checkStartOptions({ tag: '.hidden' }, open).tag).toBeDefined();
  });
});

describe('references and tags', () => {
  it('splits repository and tag (registry ports are not tags)', () => {
    expect(repositoryOf('localhost/debian:bookworm')).toBe('localhost/debian');
    expect(repositoryOf('127.0.0.1:5000/course/env:v1')).toBe('127.0.0.1:5000/course/env');
    expect(repositoryOf('127.0.0.1:5000/course/env')).toBe('127.0.0.1:5000/course/env');
    expect(tagOf('127.0.0.1:5000/course/env')).toBeNull();
    expect(tagOf('debian@sha256:abc')).toBeNull();
    expect(tagOf('debian:12@sha256:abc')).toBe('12');
  });

  it('finds the tags of a short kernelspec name among the store full names', () => {
    const names = ['localhost/debian:bookworm', 'localhost/debian:snap-1', 'localhost/debian-extra:x',
      'docker.io/library/debian:12', 'localhost/other:bookworm', 'localhost/debian@sha256:1'];
    expect(tagsFor('debian:bookworm', names)).toEqual(['12', 'bookworm', 'snap-1']);
    expect(tagsFor('localhost/debian:bookworm', names)).toEqual(['bookworm', 'snap-1']);
    expect(tagsFor('nothing:here', names)).toEqual([]);
  });
});

describe('recorded options (a notebook is a file anyone can edit)', () => {
  it('keeps short strings of known fields only', () => {
    expect(recordedStartOptions({ start_options: { memory: '1g', cpus: 2, network: 'bridge', evil: 'x', tag: '' } }))
      .toEqual({ memory: '1g', network: 'bridge' });
    expect(recordedStartOptions({ start_options: { memory: 'x'.repeat(500) } })).toBeNull();
    expect(recordedStartOptions({ start_options: ['1g'] })).toBeNull();
    expect(recordedStartOptions({ image: 'debian' })).toBeNull();
    expect(recordedStartOptions(null)).toBeNull();
    expect(recordedStartOptions('start_options')).toBeNull();
  });

  it('compacts and describes', () => {
    expect(compactOptions({ memory: ' 1g ', cpus: '', network: undefined, tag: 'v2' })).toEqual({ memory: '1g', tag: 'v2' });
    expect(describeOptions({ memory: '1g', cpus: '2', network: 'bridge', tag: 'v2' }))
      .toBe('memory 1g, 2 CPUs, network bridge, tag v2');
    expect(describeOptions({})).toBe('');
  });
});
