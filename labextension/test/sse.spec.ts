import { SSEParser } from '../src/sse';

describe('SSEParser', () => {
  it('splits events across arbitrary chunks', () => {
    const p = new SSEParser();
    expect(p.push('data: {"a"')).toEqual([]);
    expect(p.push(':1}\n')).toEqual([]);
    expect(p.push('\ndata: {"b":2}\n\ndata: x')).toEqual(['{"a":1}', '{"b":2}']);
    expect(p.push('\n\n')).toEqual(['x']);
  });
  it('joins multi-line data, skips comments and other fields, accepts CRLF', () => {
    const p = new SSEParser();
    expect(p.push(': keep-alive\r\n\r\nevent: op\r\ndata: one\r\ndata:two\r\nid: 3\r\n\r\n')).toEqual(['one\ntwo']);
  });
});
