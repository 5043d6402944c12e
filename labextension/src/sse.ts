/**
 * An incremental parser for `text/event-stream` (the operation events of the REST API).
 *
 * Owns: splitting a byte stream, arriving in arbitrary chunks, into the `data` of each event.
 * Must not: do I/O (src/api.ts feeds it from a fetch body) or trust the payload (callers parse
 * the JSON and check it).
 */
export class SSEParser {
  private buffer = '';

  /** Feed a chunk of text; returns the data of every event it completed. */
  push(chunk: string): string[] {
    this.buffer += chunk.replace(/\r\n?/g, '\n');
    const events: string[] = [];
    let end = this.buffer.indexOf('\n\n');
    while (end >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const data: string[] = [];
      for (const line of block.split('\n')) {
        if (line.startsWith(':')) {
          continue; // a comment (keep-alive)
        }
        if (line === 'data' || line.startsWith('data:')) {
          const value = line.slice(5);
          data.push(value.startsWith(' ') ? value.slice(1) : value);
        }
      }
      if (data.length) {
        events.push(data.join('\n'));
      }
      end = this.buffer.indexOf('\n\n');
    }
    return events;
  }
}
