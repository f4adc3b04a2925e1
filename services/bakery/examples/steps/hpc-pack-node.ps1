# HPC Pack compute node software from the share the head node publishes.
$ErrorActionPreference = 'Stop'
$setup = '\\hpc-head\REMINST\setup.exe'
Start-Process -FilePath $setup -ArgumentList '-unattend', '-ComputeNode:hpc-head' -Wait
Set-Content -Path 'C:\ProgramData\hpcfleet-image.txt' -Value "$env:HPCFLEET_RECIPE $env:HPCFLEET_VERSION"
