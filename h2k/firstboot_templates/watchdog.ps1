# hyper2kvm first boot: run one step with a time limit (PowerShell 2.0 and later).
# Exit code: the step's own, or 1460 (ERROR_TIMEOUT) when the limit was reached and the
# step's whole process tree (pnputil, msiexec and their children) was killed.
param([int]$Seconds, [string]$Script, [string]$Log)
$sys = Join-Path $env:SystemRoot 'System32'
$psi = New-Object System.Diagnostics.ProcessStartInfo
$psi.FileName = Join-Path $sys 'cmd.exe'
$psi.Arguments = '/c ""' + $Script + '" >>"' + $Log + '" 2>&1"'
$psi.UseShellExecute = $false
$psi.CreateNoWindow = $true
$p = [System.Diagnostics.Process]::Start($psi)
if ($p.WaitForExit($Seconds * 1000)) { exit $p.ExitCode }
& (Join-Path $sys 'taskkill.exe') /PID $p.Id /T /F | Out-Null
$p.WaitForExit(30000) | Out-Null
Add-Content -Path $Log -Value ((Get-Date -Format s) + ' watchdog: ' + $Script + ' still running after ' + $Seconds + ' s: process tree killed')
exit 1460
