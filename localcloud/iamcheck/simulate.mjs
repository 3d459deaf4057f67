// Evaluate IAM requests with @cloud-copilot/iam-simulate (AWS's policy evaluation logic:
// identity and resource policies, explicit denies, every condition operator, KMS key policies).
// stdin: a JSON array of {id, simulation}; stdout: a JSON array of {id, decision, errors}.
// decision is "Allowed", "ExplicitlyDenied", "ImplicitlyDenied" or null when the simulation was invalid
// (e.g. an action or resource ARN IAM does not know: errors says which).
import { runSimulation } from '@cloud-copilot/iam-simulate'

const chunks = []
for await (const chunk of process.stdin) chunks.push(chunk)
const cases = JSON.parse(Buffer.concat(chunks).toString('utf8'))
const out = []
for (const { id, simulation } of cases) {
  const result = await runSimulation({ serviceControlPolicies: [], resourceControlPolicies: [], ...simulation }, {})
  out.push(result.resultType === 'error'
    ? { id, decision: null, errors: result.errors }
    : { id, decision: result.overallResult, errors: null })
}
process.stdout.write(JSON.stringify(out))
