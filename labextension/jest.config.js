// Unit tests for the pure parts (src/format.ts, src/sse.ts): they import nothing from
// JupyterLab, so ts-jest compiles them as CommonJS and no browser is needed.
module.exports = {
  testEnvironment: 'node',
  testMatch: ['<rootDir>/test/**/*.spec.ts'],
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: '<rootDir>/tsconfig.test.json' }]
  }
};
