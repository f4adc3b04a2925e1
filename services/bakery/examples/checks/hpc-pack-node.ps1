# Smoke check of a fresh node: the HPC Pack node manager is installed and the image is labelled.
$ErrorActionPreference = 'Stop'
Get-Service -Name HpcNodeManager | Out-Null
if (-not (Select-String -Path 'C:\ProgramData\hpcfleet-image.txt' -Pattern $env:HPCFLEET_RECIPE -Quiet)) { exit 1 }
